"""What apet-trt's two vLLM architectures share (checked against vLLM 0.32.0): Qwen2.5-VL and Qwen3-VL
lay an image out the same way (one placeholder per merged token, 3-D M-RoPE ids (t, row, column)
offset by the image's start, the text after it at start + max(t, h/merge, w/merge)), so an ApET image
part is read, sized and placed by the same code; each model's module (qwen2_5_vl.py, qwen3_vl.py)
puts these mixins in front of vLLM's own classes for that model.

ApET keeps a scattered subset of an image's rows, so an image part may carry the fields
apet_trt.vllm_plugin lists; for such an image

  - the data parser accepts exactly those fields and checks them (shapes, dtypes, ids inside the grid);
  - the processor's field config splits rows and ids by apet_num_rows, and the prompt update expands
    the image token to R placeholders;
  - `get_mrope_input_positions` gives the image's placeholders its ids (offset by the image's start),
    and the text after it continues at start + max(t, h/2, w/2) of the uncompressed grid, as
    Transformers' `get_rope_index` does on the uncompressed prompt; the decode delta is
    max id + 1 - prompt length, as there.

The rows are handed to vLLM's own embedding code as they are: Qwen3-VL's are [R, H * (1 + levels)]
(the main row and each DeepStack level side by side), which vLLM's `embed_input_ids` splits and
scatters to the placeholders, the same R slots at every level. An image part without those fields,
and every request without such a part, goes through vLLM's own code unchanged (the methods below
hand it to the parent class).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_vl import _create_qwen2vl_field_factory
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from . import FIELDS, GRID, NUM_ROWS, POSITIONS


def is_apet(data: Mapping[str, Any] | None) -> bool:
    """An image's data (a request dict, a processed item, a feature's kwargs) carries ApET ids."""
    return data is not None and POSITIONS in data


def _value(x):
    return getattr(x, "data", x)  # a MultiModalFieldElem holds its tensor in .data


# -- the request's fields -----------------------------------------------------------------------
def fields_config(hf_inputs: Mapping[str, torch.Tensor], base: Mapping[str, MultiModalFieldConfig]):
    """vLLM's field config `base`, with the rows and ids of ApET images split by apet_num_rows."""
    if NUM_ROWS not in hf_inputs:
        return base
    sizes = torch.as_tensor(hf_inputs[NUM_ROWS]).reshape(-1)
    return {
        **base,
        "image_embeds": MultiModalFieldConfig.flat_from_sizes("image", sizes),
        POSITIONS: MultiModalFieldConfig.flat_from_sizes("image", sizes, keep_on_cpu=True),
        GRID: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        NUM_ROWS: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    }


def check_request(data: Mapping[str, torch.Tensor], merge: int, row_width: int | None) -> dict:
    """The ApET image fields of a request, rows and ids flat; refused (ValueError, which vLLM answers
    with a 400) when they do not fit together. The images' fields arrive merged: rows and ids
    concatenated (or stacked, [B, R, ...], when every image has the same R), grids and counts stacked."""
    if set(data) != set(FIELDS) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(
            f"an ApET image part holds exactly the tensors {sorted(FIELDS)}, got {sorted(data)} "
            "(apet_trt.vllm_plugin; `apet encode --format vllm-apet` writes it)"
        )
    data = dict(data)
    if data["image_embeds"].dim() == 3 and data[POSITIONS].dim() == 3:
        data["image_embeds"], data[POSITIONS] = data["image_embeds"].flatten(0, 1), data[POSITIONS].flatten(0, 1)
    rows, ids, grid, counts = data["image_embeds"], data[POSITIONS], data[GRID], data[NUM_ROWS].reshape(-1)
    if grid.shape[-1:] != (3,) or grid.dim() > 2:
        raise ValueError(f"{GRID} must be [3] (t, h, w) per image, got {list(grid.shape)}")
    grid = grid.reshape(-1, 3)
    if not rows.is_floating_point() or rows.dim() != 2:
        raise ValueError(f"image_embeds must be float [R, H], got {rows.dtype} {list(rows.shape)}")
    if row_width is not None and rows.shape[-1] != row_width:
        raise ValueError(f"image_embeds of width {rows.shape[-1]}; this model's image rows are {row_width} wide")
    for name, t in ((POSITIONS, ids), (GRID, grid), (NUM_ROWS, counts)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got {t.dtype}")
    if ids.dim() != 2 or ids.shape[-1] != 3:
        raise ValueError(f"{POSITIONS} must be [R, 3] (t, row, column), got {list(ids.shape)}")
    if len(grid) != len(counts):
        raise ValueError(f"{len(grid)} {GRID} for {len(counts)} {NUM_ROWS}")
    if len(counts) == 0 or bool((counts < 1).any()):
        raise ValueError(f"{NUM_ROWS} must be at least 1 per image, got {counts.tolist()}")
    total = int(counts.sum())
    if rows.shape[0] != total or ids.shape[0] != total:
        raise ValueError(
            f"{NUM_ROWS} sum to {total}, image_embeds has {rows.shape[0]} rows, {POSITIONS} {ids.shape[0]}"
        )
    for (t, h, w), n, own in zip(grid.tolist(), counts.tolist(), ids.split(counts.tolist())):
        if t != 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(f"{GRID} {[t, h, w]}: an image's grid is [1, h, w] with h, w multiples of {merge}")
        extent = torch.tensor([t, h // merge, w // merge])
        if not 1 <= n <= int(extent.prod()):
            raise ValueError(f"{NUM_ROWS}={n} for a grid of {int(extent.prod())} rows")
        if bool(((own < 0) | (own >= extent)).any()):
            raise ValueError(f"{POSITIONS} outside the grid {[t, h, w]} (ids are (t, row, column) of its rows)")
    return data


class ApetDataParserMixin:
    """In front of vLLM's Qwen2-VL-class data parser: an ApET image part is checked and kept whole.
    `row_width`: the width of the model's image rows (None: not checked; vLLM checks no dict-form part's)."""

    def __init__(self, *args, row_width: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_width = row_width

    def _parse_image_data(self, data):
        if not (isinstance(data, dict) and is_apet(data)):
            return super()._parse_image_data(data)
        data = check_request(data, self._spatial_merge_size, self.row_width)
        base = _create_qwen2vl_field_factory(self._spatial_merge_size)  # vLLM's own, for the other fields
        return DictEmbeddingItems(
            data,
            modality="image",
            required_fields=set(FIELDS),
            fields_factory=lambda hf_inputs: fields_config(hf_inputs, base(hf_inputs)),
        )


class ApetProcessingInfoMixin:
    """In front of vLLM's processing info: the data parser is `parser_class` (the model's own, with
    ApetDataParserMixin in front), built with the arguments vLLM's own gets and the rows' width."""

    parser_class: type

    def apet_row_width(self) -> int | None:
        """The width of an image row (None while precomputed embeddings are off): the hidden size."""
        return self._get_expected_hidden_size()

    def get_data_parser(self):
        return self.parser_class(
            self.get_hf_config().vision_config.spatial_merge_size,
            video_needs_metadata=True,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
            row_width=self.apet_row_width(),
        )


class ApetProcessorMixin:
    """In front of vLLM's multimodal processor: ApET fields split per image, R placeholders per image."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return fields_config(hf_inputs, super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        """vLLM's updates, except that an ApET image's token expands to its R rows, not to its grid."""
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        tokenizer = self.info.get_tokenizer()
        image_token = tokenizer.get_vocab()[self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token]

        def replacement(own, item_idx: int):
            item = out_mm_kwargs["image"][item_idx]
            if is_apet(item):
                return [image_token] * int(_value(item[NUM_ROWS]))
            return own(item_idx)

        return [
            PromptReplacement(
                modality=u.modality,
                target=u.target,
                replacement=(lambda i, own=u.replacement: replacement(own, i)),
            )
            if u.modality == "image" and isinstance(u, PromptReplacement)
            else u
            for u in updates
        ]


GridRun = tuple[int, np.ndarray, int, int]  # (offset, ids [3, n], extent, n): one run vLLM lays out itself


class ApetModelMixin:
    """In front of vLLM's model class: ApET image inputs become their rows as they are, and the prompt's
    M-RoPE ids place them at their own ids. `grid_runs` (per model) lays out everything else the way
    vLLM's own class does."""

    def grid_runs(self, input_tokens: list[int], features: list[MultiModalFeatureSpec]) -> Iterator[GridRun]:
        raise NotImplementedError

    # -- the rows ---------------------------------------------------------------------------
    def _parse_and_validate_image_input(self, **kwargs: object):
        if kwargs.get(POSITIONS) is None:
            return super()._parse_and_validate_image_input(**kwargs)
        return {
            "type": "apet_embeds",
            "image_embeds": kwargs["image_embeds"],
            "num_rows": torch.as_tensor(kwargs[NUM_ROWS]).reshape(-1),
        }

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] != "apet_embeds":
            return super()._process_image_input(image_input)
        rows = image_input["image_embeds"]
        if isinstance(rows, (list, tuple)):
            rows = torch.cat(list(rows))
        return rows.type(self.visual.dtype).split(image_input["num_rows"].tolist())

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        """vLLM's Qwen3-VL calls this for every image (Qwen2.5-VL only with pruning on): it appends grid
        positions only while pruning is on, which ApET parts do not take."""
        if image_input["type"] == "apet_embeds":
            if not self.is_multimodal_pruning_enabled:
                return image_embeds_split
            raise ValueError(
                "ApET image parts carry their own M-RoPE ids; vLLM's media pruning (--video-pruning-rate) "
                "would lay the image out on a grid again: serve them without it"
            )
        return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)

    # -- the positions ------------------------------------------------------------------------
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        apet = [f for f in mm_features if f.modality == "image" and is_apet(f.data)]
        if not apet:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        others = [f for f in mm_features if not (f.modality == "image" and is_apet(f.data))]
        runs = list(self.grid_runs(input_tokens, others))
        for f in apet:  # the kept rows' own ids, the extent of the uncompressed grid
            ids = _value(f.data[POSITIONS]).cpu().numpy().astype(np.int64).T
            t, h, w = (int(x) for x in _value(f.data[GRID]).reshape(-1).tolist())
            runs.append((f.mm_position.offset, ids, max(t, h // merge, w // merge), ids.shape[1]))
        pieces, done, next_id = [], 0, 0  # done: prompt index reached; next_id: the next text id
        for offset, ids, extent, length in sorted(runs, key=lambda r: r[0]):
            text = offset - done
            pieces += [np.broadcast_to(np.arange(text), (3, text)) + next_id, ids + next_id + text]
            next_id += text + extent
            done = offset + length
        tail = len(input_tokens) - done
        pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_id)
        positions = np.concatenate(pieces, axis=1)
        delta = int(positions.max()) + 1 - len(input_tokens)
        return torch.from_numpy(np.ascontiguousarray(positions)), delta
