"""The video layout (Video-LLaVA, the official encode_videos): per frame of R rows, CLS first, the
output is [CLS, the `keep` worst-reconstructed patch rows in descending-error order, each averaged
with the rows merged into it, the k seeds in FPS order]; positions are the rows' indices in the
frame. The official rules on a case worked out by hand, and the graph form against the oracle."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference, export_compressor_onnx
from apet_trt.apet_ops.reference import decide
from helpers.apet_cases import duplicated_tokens, well_posed

# Patch rows 0..6 (frame rows 1..7). Seeds from start 0: patch 0, then patch 2 (squared distance
# 1000, the farthest); they span the xy-plane, so each other row's error is its |z|: ranking
# 6 (6), 1 (4), 4 (3), 5 (2), 3 (1), then the seeds 0, 2 (error 0). keep=3 keeps 6, 1, 4 in that
# order. Every other row, seeds included, goes to its most cosine-similar kept row:
#   patch 0 (10,0,0): cosine 0 with all three, a tie, won by the first in output order: 6
#   patch 2 (0,30,0): 0, 1/sqrt(17), 1/sqrt(10)                                   -> 4
#   patch 3 (1,1,1):  1/sqrt(3), 5/sqrt(51), 4/sqrt(30) (.577, .700, .730)        -> 4
#   patch 5 (1,0,2):  2/sqrt(5), 8/sqrt(85), 6/sqrt(50) (.894, .868, .849)        -> 6
# and each kept row becomes (itself + its merged rows) / (1 + count).
CLS = torch.tensor([7.0, 7.0, 7.0])
PATCHES = torch.tensor([[10, 0, 0], [0, 1, 4], [0, 30, 0], [1, 1, 1], [0, 1, 3], [1, 0, 2], [0, 0, 6]]).double()
FRAME = torch.cat([CLS.double().unsqueeze(0), PATCHES])
P = PATCHES
EXPECTED_ROWS = torch.stack(
    [
        CLS.double(),
        (P[6] + P[0] + P[5]) / 3,
        P[1],
        (P[4] + P[2] + P[3]) / 3,
        P[0],  # the seeds, appended in FPS order (merged into kept rows too)
        P[2],
    ]
)
EXPECTED_POSITIONS = [0, 7, 2, 5, 1, 3]  # frame rows: CLS, patches 6 1 4, seeds 0 2


def test_official_rules_by_hand():
    config = ApetConfig(keep=3, basis=2, start=0, layout="video")
    dec = decide(FRAME, config)
    assert dec.seeds == [0, 2] and dec.order == [6, 1, 4, 5, 3, 0, 2]
    assert dec.candidates == [6, 1, 4] and dec.merge_targets == {0: 6, 2: 4, 3: 4, 5: 6}
    assert config.output_rows(8) == 6
    for fn in (compress_reference, lambda x, c: ApetCompressor(c)(x)):
        for dtype in (torch.float64, torch.float32):
            rows, pos = fn(FRAME.to(dtype).unsqueeze(0), config)
            assert pos.tolist() == [EXPECTED_POSITIONS]
            torch.testing.assert_close(rows[0].double(), EXPECTED_ROWS, rtol=1e-6, atol=1e-6)
            assert torch.equal(rows[0, 0], FRAME[0].to(dtype)), "CLS passes through untouched"


def test_without_merge_kept_rows_are_the_originals():
    config = ApetConfig(keep=3, basis=2, merge=False, layout="video")
    rows, pos = ApetCompressor(config)(FRAME.float().unsqueeze(0))
    assert pos.tolist() == [EXPECTED_POSITIONS]
    assert torch.equal(rows[0], FRAME.float()[EXPECTED_POSITIONS])


def video_config(**kwargs):
    return ApetConfig(**{"keep": 22, "basis": 10, "layout": "video", **kwargs})


@pytest.mark.parametrize("merge", [True, False])
def test_random_frames_match_oracle(rng, merge):
    """Video-LLaVA's geometry: 257 rows (CLS + 16x16 patches) per frame, 33 out."""
    config = video_config(merge=merge)
    starts = torch.randint(0, 256, (3,), generator=rng)
    x = well_posed(lambda g: torch.randn(257, 64, generator=g), config, 3, rng, starts=starts)
    ref_rows, ref_pos = compress_reference(x, config, start=starts)
    rows, pos = ApetCompressor(config)(x, starts)
    assert rows.shape == (3, 33, 64) and pos.shape == (3, 33)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(pos[:, 0], torch.zeros(3, dtype=torch.int64)), "CLS first"
    assert torch.equal(pos[:, -10], starts + 1), "the first seed is the start (frame row start + 1)"
    torch.testing.assert_close(rows, ref_rows, rtol=1e-4, atol=1e-5)


def test_duplicated_rows_match_oracle(rng):
    config = video_config(keep=8, basis=4)
    x = duplicated_tokens(rng, 2, 65, 16)
    ref_rows, ref_pos = compress_reference(x, config)
    rows, pos = ApetCompressor(config)(x)
    assert torch.equal(pos, ref_pos)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-4, atol=1e-5)


def test_keep_all_patch_rows(rng):
    """keep == the number of patch rows: nothing merged, every patch row in error order."""
    config = video_config(keep=12, basis=3)
    x = torch.randn(2, 13, 8, generator=rng)
    rows, pos = ApetCompressor(config)(x)
    ref_rows, ref_pos = compress_reference(x, config)
    assert torch.equal(pos, ref_pos) and sorted(pos[0, 1:13].tolist()) == list(range(1, 13))
    torch.testing.assert_close(rows, ref_rows)


@pytest.mark.parametrize("fn", [compress_reference, lambda x, c: ApetCompressor(c)(x)], ids=["oracle", "graph"])
def test_video_errors(fn):
    with pytest.raises(ValueError, match="keep=22 is larger than the number of patch rows N-1=20"):
        fn(torch.randn(1, 21, 4), video_config())
    with pytest.raises(ValueError, match="start=30 must be < the number of patch rows"):
        fn(torch.randn(1, 30, 4), video_config(start=30))
    with pytest.raises(ValueError, match="CLS row and at least one patch row"):
        fn(torch.randn(1, 1, 4), video_config(keep=1, basis=1))


def test_exported_video_graph(tmp_path, rng):
    """Frames on the batch axis, the row count symbolic: ONNX Runtime equals the oracle."""
    config = video_config(keep=6, basis=4)
    path = export_compressor_onnx(config, tmp_path / "video.onnx", num_tokens=50, dim=16, dynamic_tokens=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape == ["batch", 11, 16]
    for rows_per_frame in (50, 65):
        x = well_posed(lambda g, r=rows_per_frame: torch.randn(r, 16, generator=g), config, 4, rng)
        rows, pos = session.run(None, {"features": x.numpy()})
        ref_rows, ref_pos = compress_reference(x, config)
        np.testing.assert_array_equal(pos, ref_pos.numpy())
        np.testing.assert_allclose(rows, ref_rows.numpy(), rtol=1e-4, atol=1e-5)
