"""image_embeds payloads (runtime/serve/payload.py) against the formats vLLM and trtllm-serve decode,
re-implemented here from their source (torch.load(weights_only=True) / np.load of the base64 bytes),
and the bounded decode of untrusted payloads."""

import base64
import io
import pickle

import numpy as np
import pytest
import torch

from apet_trt.runtime.serve.errors import APIError
from apet_trt.runtime.serve.payload import EmbedsLimits, decode_part, encode_part, tensor_to_base64

LIMITS = EmbedsLimits(hidden_size=64, max_rows=160)


def _vllm_decode(b64: str) -> torch.Tensor:
    """What vLLM's ImageEmbeddingMediaIO.load_base64 does with the string."""
    raw = base64.b64decode(b64, validate=True)
    if raw[:6] == b"\x93NUMPY":
        return torch.from_numpy(np.load(io.BytesIO(raw)))
    return torch.load(io.BytesIO(raw), weights_only=True).to_dense()


def _rows(rng, r=12, h=64, dtype=torch.float32):
    return torch.randn(r, h, generator=rng).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vllm_part_decodes_as_vllm_does_and_round_trips(rng, dtype):
    rows = _rows(rng)
    part = encode_part({"image_embeds": rows}, "vllm", dtype)
    assert part["type"] == "image_embeds" and isinstance(part["image_embeds"], str)
    theirs = _vllm_decode(part["image_embeds"])
    assert theirs.dtype == dtype and tuple(theirs.shape) == (12, 64)
    assert torch.equal(theirs, rows.to(dtype))
    ours = decode_part(part, LIMITS)["image_embeds"]
    assert ours.dtype == torch.float32 and torch.equal(ours, rows.to(dtype).float())


def test_trtllm_part_and_dict_form(rng):
    rows = _rows(rng)
    part = encode_part({"image_embeds": rows}, "trtllm")
    assert set(part["image_embeds"]) == {"data"}
    assert torch.equal(torch.load(io.BytesIO(base64.b64decode(part["image_embeds"]["data"])), weights_only=True), rows)
    assert torch.equal(decode_part(part, LIMITS)["image_embeds"], rows)
    grid = torch.tensor([[1, 2, 24]])
    both = encode_part({"image_embeds": rows, "image_grid_thw": grid}, "vllm")
    assert set(both["image_embeds"]) == {"image_embeds", "image_grid_thw"}
    fields = decode_part(both, LIMITS)
    assert torch.equal(fields["image_grid_thw"], grid) and torch.equal(fields["image_embeds"], rows)
    with pytest.raises(ValueError, match="one tensor"):
        encode_part({"image_embeds": rows, "image_grid_thw": grid}, "trtllm")


def test_batched_single_and_numpy_payloads_accepted(rng):
    rows = _rows(rng)
    three_d = {"type": "image_embeds", "image_embeds": tensor_to_base64(rows[None])}
    assert torch.equal(decode_part(three_d, LIMITS)["image_embeds"], rows)
    buf = io.BytesIO()
    np.save(buf, rows.numpy())
    npy = {"type": "image_embeds", "image_embeds": base64.b64encode(buf.getvalue()).decode()}
    assert torch.equal(decode_part(npy, LIMITS)["image_embeds"], rows)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _b64(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    "payload, match",
    [
        ("not base64!!", "not valid base64"),
        (base64.b64encode(b"garbage bytes").decode(), "not a torch.save'd tensor"),
        (base64.b64encode(pickle.dumps(_Evil())).decode(), "not a torch.save'd tensor"),
        (_b64({"x": 1}), "not a tensor"),
        (_b64(torch.zeros(12, 63)), "hidden size is 64"),
        (_b64(torch.zeros(2, 12, 64)), r"must be \[R, H\]"),
        (_b64(torch.zeros(12)), r"must be \[R, H\]"),
        (_b64(torch.zeros(0, 64)), "rows; 1..160"),
        (_b64(torch.zeros(161, 64)), "rows; 1..160"),
        (_b64(torch.zeros(12, 64, dtype=torch.int64)), "dtype"),
        (_b64(torch.full((12, 64), float("nan"))), "NaN or Inf"),
    ],
)
def test_bad_payloads_are_400s(payload, match, capsys):
    with pytest.raises(APIError, match=match) as err:
        decode_part({"type": "image_embeds", "image_embeds": payload}, LIMITS)
    assert err.value.status == 400
    assert "pwned" not in capsys.readouterr().out  # the pickle never ran


def test_payload_size_is_capped_before_decoding():
    small = EmbedsLimits(hidden_size=4, max_rows=2)
    huge = "A" * (small.max_b64_chars + 4)
    with pytest.raises(APIError, match="exceed"):
        decode_part({"type": "image_embeds", "image_embeds": huge}, small)
    with pytest.raises(APIError, match="expected a base64 string"):
        decode_part({"type": "image_embeds", "image_embeds": 5}, small)
