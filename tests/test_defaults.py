"""Defaults a user expects (docs/DEFAULTS.md), on every tiny preset through `apet build` and `runtime.load`:

- no budget option: the family's paper setting (its export adapter's `paper_budget`), said on stdout
  and in the manifest, with the rows it promises through the pipeline (LLaVA-1.5 576 -> 64, LLaVA-NeXT
  T=64 per crop, Video-LLaVA 2,056 -> 264 on the shipped clip, Qwen2.5-VL floor(0.3 N)); `apet build
  --help` lists each family's default from the adapters;
- `--start random --start-seed S` for every family: the runtime draws one start per engine item
  (image, crop, frame) from a generator seeded with S; the engine's kept set equals the oracle's
  (apet_ops.compress_reference) with the drawn start on Transformers' own features, and two fresh
  loads given the same requests draw the same starts and give identical rows;
- Video-LLaVA `--frame-sampling official`: the shipped clip's frames 0, 14, ..., 99
  (np.linspace(0, 99, 8, dtype=int)), recorded in the manifest, and --no-apet rows equal
  `get_video_features` on exactly those frames, decoded independently with PyAV.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.apet_ops.compat import load_image_processor
from apet_trt.export.models.llava import parts
from apet_trt.export.models.video_llava import pixel_values
from apet_trt.export.presets import preset_config
from apet_trt.scripts.cli import main
from helpers.apet_cases import MARGIN, decision_margin

CLIP = Path(__file__).resolve().parents[1] / "assets" / "big_buck_bunny.mp4"
PRESETS = ("tiny-llava", "tiny-llava-next", "tiny-video-llava", "tiny-qwen2.5-vl")
SEED = 5


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def _build(out: Path, preset: str, *extra: str) -> tuple[Path, str]:
    rc, stdout, stderr = cli("build", "--model", preset, "--out", str(out), *extra)
    assert rc == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """Each tiny preset built with no budget option at all."""
    root = tmp_path_factory.mktemp("defaults")
    return {p: _build(root / p, p) for p in PRESETS}


@pytest.fixture(scope="module")
def randoms(tmp_path_factory):
    """Each tiny preset built with --start random (and no budget option: the paper setting)."""
    root = tmp_path_factory.mktemp("random")
    return {
        p: _build(root / p, p, "--start", "random", "--start-seed", str(SEED), "--max-batch", "3")[0] for p in PRESETS
    }


def _images(rng: np.random.Generator, sizes) -> list[Image.Image]:
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# -- 1. no budget option: the paper's setting ------------------------------------------------------
def test_help_lists_every_family_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", "--help"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, text in (
        ("llava", "T=64 rows per image (LLaVA-1.5-7B: 576 -> 64), vision stage only"),
        ("llava_next", "T=64 rows per crop"),
        ("video_llava", "22 rows + CLS + 10 seeds = 33 per frame"),
        ("qwen2_5_vl", "T = floor(0.3 N) rows per image (ratio 0.3)"),
    ):
        assert any(line.split()[:1] == [name] and text in line for line in lines), name


@pytest.mark.parametrize(
    "preset, family, apet, rows",
    [
        ("tiny-llava", "llava", {"keep": 64, "basis": 10, "start": 0}, 64),
        ("tiny-llava-next", "llava_next", {"keep": 64, "basis": 10, "start": 0}, 64),
        ("tiny-video-llava", "video_llava", {"keep": 22, "basis": 10, "layout": "video"}, 33),
        ("tiny-qwen2.5-vl", "qwen2_5_vl", {"keep": None, "keep_ratio": 0.3, "seed_blend": 0.5}, None),
    ],
)
def test_no_budget_builds_the_paper_setting(defaults, preset, family, apet, rows):
    out, stdout = defaults[preset]
    assert f"no budget given: the {family} family's paper setting" in stdout and "the paper's setting)" in stdout
    data = json.loads((out / "manifest.json").read_text())
    assert {k: data["apet"].get(k) for k in apet} == apet and data["num_visual_tokens"] == rows
    assert data["build"]["paper_budget"] is True and data["random_start"] is None and data["llm_stage"] is None


def test_no_budget_rows_through_the_pipeline(defaults):
    g = np.random.default_rng(0)
    [r] = runtime.load(defaults["tiny-llava"][0], backend="onnxruntime").encode(_images(g, [(400, 300)]))
    assert (r.num_patches, r.num_rows) == (576, 64)
    # LLaVA-NeXT: 64 per crop; a 200 x 150 image takes Transformers' 1 x 2 tiles (docs/DEFAULTS.md)
    [r] = runtime.load(defaults["tiny-llava-next"][0], backend="onnxruntime").encode(_images(g, [(200, 150)]))
    assert r.extras["grid"] == (1, 2) and tuple(r.extras["crop_positions"].shape) == (3, 64)
    assert (r.num_patches, r.num_rows) == (1368, 216)
    [r] = runtime.load(defaults["tiny-video-llava"][0], backend="onnxruntime").encode(videos=str(CLIP))
    assert (r.num_patches, r.num_rows) == (2056, 264)
    assert r.extras["frame_indices"] == [0, 12, 25, 37, 50, 62, 75, 87]  # the default: Transformers' frames
    rows = runtime.load(defaults["tiny-qwen2.5-vl"][0], backend="onnxruntime").encode(
        _images(g, [(224, 224), (280, 280)])
    )
    assert [(r.num_patches, r.num_rows) for r in rows] == [(64, 19), (100, 30)]


def test_no_apet_is_still_the_baseline(tmp_path):
    out, stdout = _build(tmp_path / "full", "tiny-video-llava", "--no-apet")
    data = json.loads((out / "manifest.json").read_text())
    assert data["apet"] is None and data["num_visual_tokens"] == 257 and "no budget given" not in stdout
    assert data["build"]["paper_budget"] is False and data["vision"]["frame_sampling"] == "transformers"


def test_a_default_that_does_not_fit_the_model_says_so(tmp_path, capsys):
    """A LLaVA checkpoint of 84 px images (N=36) cannot keep the paper's 64: one line that says the
    default was taken and what to pass instead; nothing written."""
    config, processor, tokenizer, _ = preset_config("tiny-llava")
    config.vision_config.image_size = 84
    ckpt = tmp_path / "small"
    for part in (config, processor, tokenizer):  # no weights: the check comes before any are read
        part.save_pretrained(str(ckpt))
    assert main(["build", "--model", str(ckpt), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no budget given, and the llava family's paper setting does not fit" in err[0]
    assert "keep=64" in err[0] and "pass --keep / --keep-ratio, or --no-apet" in err[0]
    assert not (tmp_path / "e").exists()


# -- 2. --start random for every family ---------------------------------------------------------------
def _features(preset: str, pipe, batch, images) -> torch.Tensor | list[torch.Tensor]:
    """Transformers' own rows ApET runs on, per engine item, for the batch's inputs."""
    model = pipe.decoder.model
    with torch.no_grad():
        if preset in ("tiny-llava", "tiny-llava-next"):  # per image / crop: the tower's layer, CLS dropped
            tower, _ = parts(model)
            hidden = tower(torch.from_numpy(batch.feeds["pixel_values"]), output_hidden_states=True).hidden_states
            return hidden[pipe.manifest.vision["feature_layer"]][:, 1:]
        if preset == "tiny-video-llava":  # per frame: all 257 rows, projected
            out = model.model.get_video_features(
                pixel_values_videos=torch.from_numpy(batch.feeds["pixel_values_videos"])[None]
            )
            return getattr(out, "pooler_output", out).float()
        processor = load_image_processor(pipe.manifest.root / "processor")  # Qwen2.5-VL: per image, merged
        out = processor(images=images, return_tensors="pt")
        features = model.model.get_image_features(out["pixel_values"], out["image_grid_thw"])
        return [x.float() for x in getattr(features, "pooler_output", features)]


def _starts(preset: str, batch) -> list[int]:
    if preset == "tiny-qwen2.5-vl":
        return [int(item["start"][0]) for item in batch.items]
    return batch.feeds["start"].tolist()


def _engine_positions(preset: str, rows) -> list[torch.Tensor]:
    """The engine's kept positions per engine item, within the item."""
    if preset == "tiny-llava-next":
        return list(torch.cat([r.extras["crop_positions"] for r in rows]))
    if preset == "tiny-video-llava":
        return [p for r in rows for p in (r.positions.reshape(8, 33) - 257 * torch.arange(8)[:, None])]
    return [r.positions for r in rows]


def _request(preset: str, g: np.random.Generator) -> dict:
    if preset == "tiny-video-llava":
        return {"videos": [str(CLIP), np.ascontiguousarray(g.integers(0, 256, (12, 120, 160, 3), dtype=np.uint8))]}
    sizes = {"tiny-llava": [(300, 300), (420, 180), (160, 400)], "tiny-llava-next": [(200, 150), (500, 300)]}
    return {"images": _images(g, sizes.get(preset, [(224, 224), (336, 196), (280, 280)]))}


def _item_rows(preset: str, batch) -> list[int]:
    """The rows FPS draws its start among, per engine item."""
    if preset == "tiny-qwen2.5-vl":
        return [item["num_rows"] for item in batch.items]
    count = len(batch.feeds["start"])
    return [256 if preset == "tiny-video-llava" else 576] * count


@pytest.mark.parametrize("preset", PRESETS)
def test_random_starts_equal_the_oracle_and_repeat_with_the_seed(randoms, preset):
    out = randoms[preset]
    data = json.loads((out / "manifest.json").read_text())
    assert data["random_start"] == {"seed": SEED} and "start" in [i["name"] for i in data["io"]["inputs"]]
    first = runtime.load(out, backend="onnxruntime", decoder="transformers")
    second = runtime.load(out, backend="onnxruntime")
    eager = runtime.load(out, backend="torch")  # the PyTorch module takes the same start input
    apet = ApetConfig.from_dict(first.manifest.apet)
    draws = torch.Generator().manual_seed(SEED)
    g = np.random.default_rng(1)
    checked = differs = 0
    for call in range(2):  # the sequence continues from request to request, the same in a fresh load
        request = _request(preset, g)
        media = first._media(request.get("images"), request.get("videos"))
        batch, again, torch_batch = (p.family.preprocess(media) for p in (first, second, eager))
        starts = _starts(preset, batch)
        expected = [int(torch.randint(0, n, (1,), generator=draws)) for n in _item_rows(preset, batch)]
        assert starts == expected and _starts(preset, again) == starts == _starts(preset, torch_batch), call
        rows = first.family.encode(first.vision, batch)
        for a, b in zip(rows, second.family.encode(second.vision, again)):
            assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.positions, b.positions)
        for a, b in zip(rows, eager.family.encode(eager.vision, torch_batch)):
            assert torch.equal(a.positions, b.positions) and float((a.embeddings - b.embeddings).abs().max()) <= 1e-5
        features = _features(preset, first, batch, request.get("images"))
        for x, start, got in zip(features, starts, _engine_positions(preset, rows)):
            if decision_margin(x, apet, start) <= MARGIN:
                continue  # a float32 near-tie: either answer is right
            _, want = compress_reference(x[None], apet, start=[start])
            assert got.tolist() == want[0].tolist(), f"request {call}, start {start}"
            _, fixed = compress_reference(x[None], apet, start=[0])
            checked, differs = checked + 1, differs + (fixed[0].tolist() != want[0].tolist())
    assert checked >= 4 and differs >= 1  # the drawn starts reach the engine and change what it keeps


# -- 3. Video-LLaVA --frame-sampling official -------------------------------------------------------
def _decode_all(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_official_frame_sampling_reads_the_linspace_frames(tmp_path):
    out, _ = _build(tmp_path / "official", "tiny-video-llava", "--no-apet", "--frame-sampling", "official")
    pipe = runtime.load(out, backend="onnxruntime", decoder="transformers")
    assert pipe.manifest.vision["frame_sampling"] == "official"
    frames = _decode_all(CLIP)
    assert len(frames) == 100
    picked = np.linspace(0, len(frames) - 1, 8, dtype=int).tolist()
    assert picked == [0, 14, 28, 42, 56, 70, 84, 99]
    [rows] = pipe.encode(videos=str(CLIP))
    assert rows.extras["frame_indices"] == picked and rows.num_rows == 2056
    processor = load_image_processor(out / "processor")
    with torch.no_grad():
        ref = pipe.decoder.model.model.get_video_features(
            pixel_values_videos=pixel_values(processor, frames[picked])[None]
        )
    ref = getattr(ref, "pooler_output", ref).float().flatten(0, 1)
    assert float((rows.embeddings - ref).abs().max()) <= 1e-5
    # frames decoded here vs Transformers' sampling: not the same rows (the test can fail)
    default = frames[[0, 12, 25, 37, 50, 62, 75, 87]]
    with torch.no_grad():
        other = pipe.decoder.model.model.get_video_features(pixel_values_videos=pixel_values(processor, default)[None])
    assert float((rows.embeddings - getattr(other, "pooler_output", other).float().flatten(0, 1)).abs().max()) > 1e-3
    rc, text, _ = cli("inspect", str(out))
    assert rc == 0 and "frame_sampling official" in text


def test_frame_sampling_is_refused_where_it_cannot_apply(tmp_path, capsys):
    assert main(["build", "--model", "tiny-llava", "--frame-sampling", "official", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--frame-sampling official: the llava family takes no videos" in err[0]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exc:
        main(["build", "--model", "tiny-video-llava", "--frame-sampling", "decord", "--out", str(tmp_path / "e")])
    assert exc.value.code == 2 and "invalid choice: 'decord'" in capsys.readouterr().err
