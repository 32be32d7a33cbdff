"""Visual rows as an `image_embeds` chat content part, both ways.

The formats, read from the servers' source:
- vLLM (vllm/entrypoints/chat_utils.py `parse_image_embeds`, vllm/multimodal/media/image.py
  `ImageEmbeddingMediaIO`): `{"type": "image_embeds", "image_embeds": <b64>}` where <b64> is the
  base64 of a `torch.save`d tensor (decoded with `torch.load(weights_only=True)` then `.to_dense()`,
  or `np.load` when the bytes start with numpy's magic). LLaVA-1.5 / LLaVA-NeXT take [R, H] per part
  (one part per image; [1, R, H] still works, deprecated) and expand the image token to R
  placeholders. Models that need more per image (Qwen2.5-VL) take the dict form
  `{"image_embeds": <b64>, "image_grid_thw": <b64>}`, split by grid size. The server must run with
  `--enable-mm-embeds`.
- vLLM with apet-trt's plugin (apet_trt.vllm_plugin, docs/VLLM_PLUGIN.md), format "vllm-apet": vLLM's
  dict form holding the family's `vllm_plugin_fields` (Qwen2.5-VL: the rows, each row's M-RoPE id, the
  uncompressed grid, the row count). vLLM's own Qwen2.5-VL refuses it (no `image_grid_thw`) with a 400.
- trtllm-serve (tensorrt_llm/serve/chat_utils.py): `{"type": "image_embeds", "image_embeds":
  {"data": <b64>}}`, the same torch.save'd tensor (`torch.load(weights_only=True)`).

Decoding is for untrusted input: the base64 text is capped before it is decoded; before anything
loads, the uncompressed size of every member of a torch.save archive (its zip central directory) or
the array a .npy header declares is checked against the largest tensor the engine can take and
charged to the request's decoding budget (so a deflated 1 GiB tensor in 1 MB is refused unread);
only tensors load (weights_only, sparse invariants checked, numpy without pickles), and the result
must be a dense float tensor [R, H] (or [1, R, H]) with H the engine's hidden size, 1 <= R <= the
context, all finite.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .errors import bad_request
from .limits import DecodeBudget

NUMPY_MAGIC = b"\x93NUMPY"
FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES = {name: dtype for dtype, name in FLOAT_DTYPES.items()}
_MAX_FIELD_ELEMENTS = 4096  # a family's small extra fields (e.g. a grid [1, 3])
_MAX_MEMBERS = 64  # a torch.save archive of one tensor has five
_FRAMING = 64 << 10  # torch.save's pickle and records besides the tensor's bytes


@dataclass(frozen=True)
class EmbedsLimits:
    hidden_size: int  # H: the LLM's width
    max_rows: int  # R at most (the decoder's context)

    @property
    def max_tensor_bytes(self) -> int:
        """The largest acceptable tensor, float32, plus torch.save's framing."""
        return self.max_rows * self.hidden_size * 4 + _FRAMING

    @property
    def max_b64_chars(self) -> int:
        """Base64 text of the largest acceptable float32 tensor, plus torch.save's zip framing."""
        return (self.max_tensor_bytes * 4) // 3 + 4


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def tensor_to_base64(tensor: torch.Tensor) -> str:
    """What vLLM's own client helper (`tensor2base64`) writes: base64 of torch.save."""
    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def handoff_fields(family, rows, fmt: str = "vllm") -> dict[str, torch.Tensor]:
    """One image's rows as the tensors the format `fmt` sends: the family's plugin fields for
    "vllm-apet", its handoff fields otherwise."""
    return family.vllm_plugin_fields(rows) if fmt == "vllm-apet" else family.handoff_fields(rows, fmt)


def encode_part(fields: dict[str, torch.Tensor], fmt: str = "vllm", dtype: torch.dtype = torch.float32) -> dict:
    """One image's handoff fields (`handoff_fields`) -> the content part. The rows go in `dtype` (the
    serving engine's: a float32 payload is twice a float16 one)."""
    fields = {k: (v.to(dtype) if k == "image_embeds" else v) for k, v in fields.items()}
    if fmt == "trtllm":
        if set(fields) != {"image_embeds"}:
            raise ValueError(f"trtllm-serve's image_embeds part holds one tensor; this family sends {sorted(fields)}")
        return {"type": "image_embeds", "image_embeds": {"data": tensor_to_base64(fields["image_embeds"])}}
    if fmt not in ("vllm", "vllm-apet"):
        raise ValueError(f"unknown image_embeds format {fmt!r} (vllm, vllm-apet, trtllm)")
    if set(fields) == {"image_embeds"}:
        return {"type": "image_embeds", "image_embeds": tensor_to_base64(fields["image_embeds"])}
    return {"type": "image_embeds", "image_embeds": {k: tensor_to_base64(v) for k, v in fields.items()}}


def _npy_bytes(raw: bytes) -> int:
    """The bytes of the array a .npy header declares (read without loading the array)."""
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("an object array (pickles are not loaded)")
    count = 1
    for n in shape:
        count *= int(n)
    return count * dtype.itemsize


def _zip_bytes(raw: bytes) -> int:
    """The uncompressed bytes of every member of a zip archive, from its central directory."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        members = archive.infolist()
        if len(members) > _MAX_MEMBERS:
            raise ValueError(f"an archive of {len(members)} members")
        return sum(int(m.file_size) for m in members)


def unpacked_size(raw: bytes, where: str) -> int:
    """What loading these bytes would unpack, known before it is loaded; 400 for anything that is
    neither a .npy array nor a torch.save (zip) archive (the legacy pickle format sizes its storages
    inside the pickle)."""
    try:
        if raw[:6] == NUMPY_MAGIC:
            return _npy_bytes(raw)
        if zipfile.is_zipfile(io.BytesIO(raw)):
            return _zip_bytes(raw)
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise bad_request(f"{where}: not a readable torch.save archive or .npy array ({msg})") from exc
    raise bad_request(f"{where}: not a torch.save'd tensor (zip archive) or .npy array")


def _load_tensor(text, max_chars: int, where: str, max_bytes: int, budget: DecodeBudget | None) -> torch.Tensor:
    if not isinstance(text, str):
        raise bad_request(f"{where}: expected a base64 string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise bad_request(f"{where}: {len(text)} base64 characters exceed this engine's limit of {max_chars}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{where}: not valid base64 ({exc})") from exc
    size = unpacked_size(raw, where)
    if size > max_bytes:
        raise bad_request(
            f"{where}: the payload unpacks to {size:,} bytes; this engine takes at most {max_bytes:,}",
            code="invalid_image_embeds",
        )
    if budget is not None:
        budget.charge(size, f"{where}: the image embeddings")
    try:
        if raw[:6] == NUMPY_MAGIC:
            tensor = torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
        else:
            with torch.sparse.check_sparse_tensor_invariants(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unpickler's notes about foreign protocols
                tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # whatever the unpickler or numpy says about foreign bytes
        msg = " ".join(str(exc).split())[:200]
        raise bad_request(f"{where}: not a torch.save'd tensor or .npy array ({type(exc).__name__}: {msg})") from exc
    if not isinstance(tensor, torch.Tensor):
        raise bad_request(f"{where}: the payload holds a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:  # sparse: a few bytes can stand for a huge dense tensor
        dense = tensor.numel() * tensor.element_size()
        if dense > max_bytes:
            raise bad_request(
                f"{where}: a sparse tensor of shape {list(tensor.shape)} is {dense:,} bytes dense; this engine takes "
                f"at most {max_bytes:,}",
                code="invalid_image_embeds",
            )
        if budget is not None:
            budget.charge(dense, f"{where}: the embeddings made dense")
        try:
            tensor = tensor.to_dense()
        except Exception as exc:
            raise bad_request(f"{where}: the sparse tensor cannot be made dense ({type(exc).__name__})") from exc
    return tensor


def _check_rows(tensor: torch.Tensor, limits: EmbedsLimits, where: str) -> torch.Tensor:
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]  # vLLM still takes [1, R, H] (deprecated): so do we
    if tensor.dim() != 2:
        raise bad_request(
            f"{where}: image embeddings must be [R, H] (or [1, R, H]), got shape {list(tensor.shape)}",
            code="invalid_image_embeds",
        )
    rows, width = int(tensor.shape[0]), int(tensor.shape[1])
    if width != limits.hidden_size:
        raise bad_request(
            f"{where}: embeddings of width {width}, this model's hidden size is {limits.hidden_size}",
            code="invalid_image_embeds",
        )
    if not 1 <= rows <= limits.max_rows:
        raise bad_request(f"{where}: {rows} rows; 1..{limits.max_rows} fit this model", code="invalid_image_embeds")
    if tensor.dtype not in FLOAT_DTYPES:
        raise bad_request(
            f"{where}: embeddings of dtype {tensor.dtype}, expected one of {sorted(FLOAT_DTYPES.values())}",
            code="invalid_image_embeds",
        )
    tensor = tensor.to(torch.float32).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        raise bad_request(f"{where}: embeddings hold NaN or Inf", code="invalid_image_embeds")
    return tensor


def decode_part(
    part: dict, limits: EmbedsLimits, where: str = "image_embeds", budget: DecodeBudget | None = None
) -> dict[str, torch.Tensor]:
    """An `image_embeds` content part (either server's format) -> checked tensors by field name,
    "image_embeds" [R, H] float32 among them, charged to `budget`. Raises APIError(400) naming what
    is wrong."""
    value = part.get("image_embeds")
    if isinstance(value, str):
        texts = {"image_embeds": value}
    elif isinstance(value, dict) and set(value) == {"data"}:  # trtllm-serve
        texts = {"image_embeds": value["data"]}
    elif isinstance(value, dict) and "image_embeds" in value:  # vLLM's dict form
        texts = dict(value)
    else:
        raise bad_request(
            f"{where}: expected a base64 string, {{'data': <base64>}} or {{'image_embeds': <base64>, ...}}",
            code="invalid_image_embeds",
        )
    max_chars = limits.max_b64_chars
    out: dict[str, torch.Tensor] = {}
    for key, text in texts.items():
        name = f"{where}.{key}" if key != "image_embeds" or len(texts) > 1 else where
        rows = key == "image_embeds"
        max_bytes = limits.max_tensor_bytes if rows else _MAX_FIELD_ELEMENTS * 8 + _FRAMING
        tensor = _load_tensor(text, max_chars if rows else (max_bytes * 4) // 3 + 4, name, max_bytes, budget)
        if rows:
            if budget is not None and tensor.dtype != torch.float32:  # the float32 copy _check_rows makes
                budget.charge(tensor.numel() * 4, f"{where}: the embeddings as float32")
            out[key] = _check_rows(tensor, limits, where)
        else:
            if tensor.numel() > _MAX_FIELD_ELEMENTS or tensor.dim() > 2 or tensor.is_complex():
                raise bad_request(f"{where}.{key}: a field of shape {list(tensor.shape)} is not accepted")
            out[key] = tensor
    return out
