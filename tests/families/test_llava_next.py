"""LLaVA-NeXT (anyres) end to end on a tiny checkpoint saved with save_pretrained and built by path.

What each group shows:
  layout     the unpadding window equals Transformers' own `unpad_image`; with --no-apet the rows
             equal Transformers' packed features (get_image_features + pack_image_features) for
             square, wide, tall, extreme and tiny images; with ApET the rows equal the official ApET
             arrangement (MaQianKun0/ApET llava_arch.py: keep mask through the anyres layout and
             unpadding, every newline kept, base first) re-implemented here on Transformers' helpers
  per crop   each crop's kept positions equal apet_ops.compress_reference on that crop's own
             Hugging Face tower features, its embeddings the projector of the oracle's tokens
  engine     crops run in chunks of at most batch.max; the manifest's llava_next object, the
             newline file listed and hashed, the io's dynamic crops axis
  decoders   greedy ids equal LlavaNextForConditionalGeneration.generate on the same embeddings;
             TensorRT-LLM's LLM API request (tensorrt_llm emulated at the boundary, following its
             LlavaNextInputProcessor) gives the same ids; the prompt table with NeXT's row counts
             gives the inputs_embeds logits
  CLI        apet run --json fields, --grid and --overlay over both pictures of the image
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import re
import shutil
import sys
import types
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.presets import load_preset
from apet_trt.runtime.decoders import SamplingConfig, TensorRTLLMAPIDecoder, TransformersDecoder
from apet_trt.runtime.decoders.prompt_table import build_prompt_table_inputs
from apet_trt.runtime.families.llava_next import unpadded_window
from apet_trt.runtime.manifest import ManifestError, load_manifest
from apet_trt.scripts.cli import main
from helpers.apet_cases import MARGIN, decision_margin

PRESET = "tiny-llava-next"
T, K, N = 64, 10, 576
PROMPT = "What is in the picture?"
SIZES = {  # (width, height)
    "square": (300, 300),
    "wide": (420, 180),
    "tall": (160, 400),
    "very wide": (990, 110),
    "tiny": (20, 20),
}


def _images(rng: torch.Generator, sizes=SIZES) -> dict[str, Image.Image]:
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    g = np.random.default_rng(seed)
    return {k: Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for k, (w, h) in sizes.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    loaded = load_preset(PRESET)
    path = tmp_path_factory.mktemp("llava_next") / "checkpoint"
    loaded.model.save_pretrained(str(path))
    loaded.processor.save_pretrained(str(path))
    loaded.tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def engines(checkpoint) -> dict[str, Path]:
    """A saved checkpoint built by path: the ApET engine (T=64, at most 3 crops a call) and the
    --no-apet baseline."""
    root = checkpoint.parent
    out = {"apet": root / "t64", "full": root / "full"}
    build(BuildConfig(model=str(checkpoint), out=str(out["apet"]), keep=T, basis=K, max_batch=3), quiet=True)
    build(BuildConfig(model=str(checkpoint), out=str(out["full"]), no_apet=True, max_batch=8), quiet=True)
    return out


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def pipes(engines):
    return {k: runtime.load(v, backend="onnxruntime", decoder="transformers") for k, v in engines.items()}


def _inner(model):
    return getattr(model, "model", model)  # Transformers >= 4.52 nests the parts under .model


# --- the layout ------------------------------------------------------------------------------


def test_unpadding_window_equals_transformers_unpad_image(rng):
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    side = 24
    sizes = [(1, 1), (1, 5000), (5000, 1), (336, 672), (672, 336), (500, 500), (181, 419)]
    sizes += [tuple(int(x) for x in torch.randint(1, 4000, (2,), generator=rng)) for _ in range(200)]
    for height, width in sizes:
        for grid in [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]:
            rows, cols = grid[0] * side, grid[1] * side
            index = torch.arange(rows * cols).reshape(1, rows, cols)
            kept = unpad_image(index, (height, width))[0]
            r0, r1, c0, c1 = unpadded_window((height, width), grid, side)
            assert torch.equal(kept, index[0, r0:r1, c0:c1]), (height, width, grid)


def test_no_apet_rows_equal_transformers_packed_features(pipes, hf_model, checkpoint, rng):
    from apet_trt.apet_ops.compat import load_image_processor
    from apet_trt.export.models.llava_next import LlavaNextExport

    images = _images(rng)
    rows = pipes["full"].encode(list(images.values()))
    reference = LlavaNextExport(hf_model.config).reference_rows(
        hf_model, load_image_processor(checkpoint), list(images.values())
    )
    for name, r, ref in zip(images, rows, reference):
        diff = float((r.embeddings - ref).abs().max())
        print(f"{name:9s} {images[name].size}: {r.num_rows} rows (grid {r.extras['grid']}), max|diff| {diff:.2e}")
        assert r.embeddings.shape == ref.shape, name
        assert diff <= 1e-5, name
        assert r.num_patches == r.num_rows and torch.equal(r.positions, torch.arange(r.num_rows)), name


def official_arrangement(crop_emb, crop_pos, newline, image_size, pinpoints):
    """The official ApET code's LLaVA-NeXT path (llava_arch.py prepare_inputs_labels_for_multimodal,
    mm_patch_merge_type 'spatial_unpad', image_aspect_ratio 'anyres'), on Transformers' helpers:
    the per-crop keep mask goes through the same view / permute / unpad as the features, a column of
    ones (the newlines) is appended, base rows first. Returns (rows [R, H], positions [R])."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    crops, _, hidden = crop_emb.shape
    side = int(N**0.5)
    features = torch.zeros(crops, N, hidden)
    mask = torch.zeros(crops, N, dtype=torch.bool)
    for c in range(crops):
        features[c, crop_pos[c]] = crop_emb[c]
        mask[c, crop_pos[c]] = True
    base_feature, base_mask = features[0], mask[0]
    gh, gw = get_anyres_image_grid_shape(image_size, pinpoints, 336)
    feat = features[1:].view(gh, gw, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    m = mask[1:].view(gh, gw, side, side).permute(0, 2, 1, 3).contiguous().unsqueeze(0).flatten(1, 2).flatten(2, 3)
    feat, m = unpad_image(feat, image_size), unpad_image(m, image_size)
    feat = torch.cat((feat, newline[:, None, None].expand(*feat.shape[:-1], 1)), dim=-1)
    m = torch.cat((m, torch.ones(*m.shape[:-1], 1, dtype=torch.bool)), dim=-1)
    feat, m = feat.flatten(1, 2).transpose(0, 1), m.flatten(1, 2).squeeze(0)
    full_mask = torch.cat((base_mask, m))
    rows = torch.cat((base_feature[base_mask], feat[m]))
    return rows, torch.nonzero(full_mask).flatten()


def test_apet_rows_follow_the_official_arrangement(pipes, hf_model, rng):
    images = _images(rng)
    apet, full = pipes["apet"], pipes["full"]
    rows, baseline = apet.encode(list(images.values())), full.encode(list(images.values()))
    newline = _inner(hf_model).image_newline.detach().float()
    pinpoints = hf_model.config.image_grid_pinpoints
    for (name, image), r, u in zip(images.items(), rows, baseline):
        engine = apet.vision.run(apet.preprocess(image).feeds)  # this image's crops, straight from the engine
        emb, pos = engine["embeddings"].float(), engine["positions"]
        assert torch.equal(pos, r.extras["crop_positions"]), name
        expected, positions = official_arrangement(emb, pos, newline, (image.height, image.width), pinpoints)
        assert torch.equal(r.positions, positions), name
        assert float((r.embeddings - expected).abs().max()) <= 1e-6, name
        assert r.num_patches == u.num_rows and r.num_rows < u.num_rows, name
        newlines = apet.family.layout((image.height, image.width)).newline_rows()
        assert bool(torch.isin(newlines, r.positions).all()), f"{name}: every newline row is kept"
        assert bool((r.embeddings[torch.isin(r.positions, newlines)] == newline).all()), name
        base = int((r.positions < N).sum())
        assert base == T and bool((r.positions[:base] < N).all()), f"{name}: the base crop's T rows first"
        print(f"{name:9s} grid {r.extras['grid']}: {u.num_rows} -> {r.num_rows} rows ({newlines.numel()} newlines)")


# --- per crop: the engine against the oracle ----------------------------------------------------


def _tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = _inner(model).vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def test_each_crops_kept_positions_equal_the_oracle(pipes, hf_model, rng):
    """Crop by crop, on the crops whose decisions float32 can resolve (a near-tie closer than float32
    resolution has two right answers: helpers/apet_cases.py); at least 8 crops of fresh images."""
    apet = ApetConfig(keep=T, basis=K)
    pipe = pipes["apet"]
    checked, rel = 0, 0.0
    for _ in range(10):
        images = _images(rng, {k: SIZES[k] for k in ("square", "wide", "tall")})
        batch = pipe.preprocess(list(images.values()))
        features = _tower_features(hf_model, torch.from_numpy(batch.feeds["pixel_values"]))
        rows = pipe.family.encode(pipe.vision, batch)
        crop_positions = torch.cat([r.extras["crop_positions"] for r in rows])
        assert crop_positions.shape == (features.shape[0], T)
        engine = pipe.vision.run(batch.feeds)["embeddings"].float()
        for c in range(features.shape[0]):
            if decision_margin(features[c], apet) <= MARGIN:
                continue
            tokens, positions = compress_reference(features[c : c + 1], apet)
            assert torch.equal(crop_positions[c], positions[0]), f"crop {c}"
            with torch.no_grad():
                expected = _inner(hf_model).multi_modal_projector(tokens.float())[0]
            rel = max(rel, float((engine[c] - expected).abs().max() / expected.abs().max()))
            checked += 1
        if checked >= 8:
            break
    print(f"{checked} crops: positions equal the oracle; embeddings relative error {rel:.2e}")
    assert checked >= 8, "too few well-posed crops drawn"
    assert rel < 1e-4


# --- the engine and its directory -----------------------------------------------------------------


def test_rows_per_image_are_not_fixed(pipes):
    assert pipes["apet"].num_visual_tokens is None  # they depend on the image
    assert pipes["apet"].manifest.num_visual_tokens == T  # per crop


def test_engine_runs_in_chunks_of_at_most_batch_max(pipes, rng):
    pipe = pipes["apet"]
    assert pipe.manifest.batch_max == 3
    images = list(_images(rng, {k: SIZES[k] for k in ("square", "wide", "tall")}).values())
    batch = pipe.preprocess(images)
    calls = []

    def run(feeds):
        calls.append(feeds["pixel_values"].shape[0])
        return pipe.vision.run(feeds)

    rows = pipe.family.encode(run, batch)
    total = batch.feeds["pixel_values"].shape[0]
    assert sum(calls) == total and max(calls) <= 3 and len(calls) == -(-total // 3)
    one_call = pipe.vision.run(batch.feeds)  # the same crops in one call
    pos = torch.cat([r.extras["crop_positions"] for r in rows])
    assert torch.equal(pos, one_call["positions"])
    alone = [pipe.encode(img)[0] for img in images]  # each image in its own request
    for r, a in zip(rows, alone):
        assert torch.equal(r.positions, a.positions) and torch.allclose(r.embeddings, a.embeddings, atol=1e-6)


def test_manifest_names_the_layout_and_a_hashed_newline_file(engines, hf_model, checkpoint):
    from safetensors.numpy import load_file

    manifest = load_manifest(engines["apet"])
    d = manifest.data
    assert manifest.family == "llava_next" and d["model"]["source"] == "path"
    assert d["io"]["inputs"][0]["shape"] == ["crops", 3, 336, 336]
    assert [o["shape"][0] for o in d["io"]["outputs"]] == ["crops", "crops"]
    section = d["llava_next"]
    assert section["image_grid_pinpoints"] == hf_model.config.image_grid_pinpoints
    rel = section["image_newline"]
    assert not Path(rel).is_absolute() and rel in d["files"]
    assert d["files"][rel]["sha256"] == hashlib.sha256((engines["apet"] / rel).read_bytes()).hexdigest()
    saved = load_file(str(engines["apet"] / rel))["image_newline"]
    assert np.array_equal(saved, _inner(hf_model).image_newline.detach().float().numpy())
    # base + 4 tiles at T, plus the 48 newline rows of the 2 x 2 grid
    assert section["max_rows_per_image"] == 5 * T + 48
    assert d["decoder"]["transformers"]["checkpoint"] is None  # the checkpoint built by path, referenced:
    assert d["external_checkpoint"]["path"] == str(checkpoint.resolve())


def test_the_documented_llava_next_object_is_what_the_build_writes(engines):
    text = (Path(__file__).resolve().parents[2] / "docs" / "ENGINE_DIR.md").read_text()
    block = re.search(r'```jsonc\n\s*"llava_next": (\{.*?\n  \})\n```', text, re.S).group(1)
    documented = json.loads(re.sub(r"//[^\n]*", "", block))
    written = load_manifest(engines["apet"]).data["llava_next"]
    assert set(documented) == set(written)
    assert documented["image_grid_pinpoints"] == written["image_grid_pinpoints"]
    assert documented["max_rows_per_image"] == 5 * T + 48 == written["max_rows_per_image"]


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("llava_next"), "llava_next"),
        (lambda d: d["llava_next"].update(image_newline="../outside.safetensors"), "inside the engine directory"),
        (lambda d: d["llava_next"].update(image_newline="other.safetensors"), "not listed in files"),
        (lambda d: d["llava_next"].update(image_grid_pinpoints=[[336]]), "image_grid_pinpoints"),
        (lambda d: d["llava_next"].update(image_newline="vision.onnx"), "not a readable safetensors"),
        (lambda d: d["llava_next"].update(image_grid_pinpoints=[[300, 600]]), "multiples of 336"),
    ],
)
def test_a_bad_llava_next_section_is_one_clear_error(engines, tmp_path, edit, message):
    broken = _edited_copy(engines["apet"], tmp_path / "broken", edit)
    with pytest.raises(ManifestError, match=message) as info:
        runtime.load(broken, backend="onnxruntime", decoder="transformers")
    assert "\n" not in str(info.value)


# --- decoders ---------------------------------------------------------------------------------


def _hf_generate(model, tokenizer, manifest, prompt, rows, new):
    """LlavaNextForConditionalGeneration.generate on inputs_embeds: the prompt's image token
    repeated R times and replaced by the rows, as get_placeholder_mask + masked_scatter do."""
    text = manifest.prompt_template.format(prompt=prompt).replace(
        manifest.image_token, manifest.image_token * len(rows)
    )
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == manifest.llm["image_token_id"]] = rows.to(embeds.dtype)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=manifest.llm["pad_token_id"],
            eos_token_id=manifest.llm["eos_token_id"],
        )
    ids = out[0].tolist()
    eos = manifest.llm["eos_token_id"]
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_greedy_ids_equal_transformers_generate(pipes, hf_model, rng):
    pipe = pipes["apet"]
    image = _images(rng, {"wide": SIZES["wide"]})["wide"]
    [result] = pipe.generate(image, PROMPT, max_new_tokens=10)
    [rows] = pipe.encode(image)
    assert result.num_kept == rows.num_rows and result.positions == rows.positions.tolist()
    expected = _hf_generate(hf_model, pipe.tokenizer, pipe.manifest, PROMPT, rows.embeddings, 10)
    print(f"{rows.num_patches} -> {rows.num_rows} rows; greedy ids {result.ids}")
    assert result.ids == expected


class _EmulatedLLM:
    """tensorrt_llm.LLM at the boundary, doing what TensorRT-LLM 1.2 does with a request that holds
    "multi_modal_embeddings" for LLaVA-NeXT (tensorrt_llm/llmapi/llm.py generate_async ->
    LlavaNextInputProcessor.attach_multimodal_embeddings -> _postprocess; the model's
    fuse_input_embeds), then greedy decoding on the checkpoint's language model."""

    requests: list = []

    def __init__(self, model: str, **kwargs):
        from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = LlavaNextForConditionalGeneration.from_pretrained(model).eval()
        self.config = self.model.config

    def _postprocess(self, input_ids: torch.Tensor, mm_features: list[torch.Tensor]):
        image_id = self.config.image_token_id
        vocab = self.config.text_config.vocab_size
        where = torch.nonzero(input_ids == image_id).flatten()
        lengths = [f.shape[0] for f in mm_features]  # a list of 2-D tensors: one split per image
        assert len(where) == len(lengths), "one image token per list entry"
        splits = list(input_ids.tensor_split(torch.cat([where, where + 1]).unique()))
        oov = list(torch.arange(vocab, vocab + sum(lengths)).split(lengths))
        k = 0
        for i, s in enumerate(splits):
            if bool((s == image_id).any()):
                splits[i] = oov[k]
                k += 1
        return torch.cat(splits), torch.cat(mm_features)

    def generate_async(self, inputs: dict, sampling_params, streaming: bool = False):
        assert set(inputs) == {"prompt", "multi_modal_embeddings"} and streaming
        type(self).requests.append(inputs)
        images = inputs["multi_modal_embeddings"]["image"]
        assert isinstance(images, list) and all(x.dim() == 2 for x in images)
        input_ids = self.tokenizer(inputs["prompt"], return_tensors="pt").input_ids[0]  # BOS added
        ids, mm = self._postprocess(input_ids, images)
        embed = self.model.get_input_embeddings()
        with torch.no_grad():
            embeds = torch.empty(ids.shape[0], mm.shape[-1])
            text = ids < embed.num_embeddings
            embeds[text] = embed(ids[text])
            embeds[~text] = mm.to(embeds.dtype)
            assert sampling_params.top_k == 1, "greedy"
            out = self.model.generate(
                inputs_embeds=embeds[None],
                attention_mask=torch.ones(1, ids.shape[0], dtype=torch.int64),
                max_new_tokens=sampling_params.max_tokens,
                do_sample=False,
                eos_token_id=sampling_params.end_id,
                pad_token_id=sampling_params.pad_id,
            )
        tokens = out[0].tolist()
        if sampling_params.end_id in tokens:
            tokens = tokens[: tokens.index(sampling_params.end_id) + 1]
        return _EmulatedResult(tokens)


class _EmulatedResult:
    def __init__(self, tokens):
        self.outputs = [types.SimpleNamespace(token_ids=tokens)]
        self.steps = len(tokens)

    def __next__(self):
        if self.steps == 0:
            raise StopIteration
        self.steps -= 1
        return self

    def result(self):
        return self


class _SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def test_tensorrt_llm_api_request_gives_the_transformers_decoders_ids(pipes, engines, checkpoint, monkeypatch, rng):
    fake = types.ModuleType("tensorrt_llm")
    fake.LLM, fake.SamplingParams = _EmulatedLLM, _SamplingParams
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    _EmulatedLLM.requests = []
    pipe = pipes["apet"]
    m = pipe.manifest
    decoder = TensorRTLLMAPIDecoder(
        checkpoint,
        image_token=m.image_token,
        max_length=int(m.llm["max_position_embeddings"]),
        dtype=torch.float32,
        eos_token_id=m.llm["eos_token_id"],
        pad_token_id=m.llm["pad_token_id"],
        device="cpu",
    )
    images = list(_images(rng, {k: SIZES[k] for k in ("wide", "tall")}).values())
    rows = pipe.encode(images)
    assert rows[0].num_rows != rows[1].num_rows
    prompts = [pipe.assemble(PROMPT, [r], i) for i, r in enumerate(rows)]
    visual = [[r.embeddings] for r in rows]
    sampling = SamplingConfig(max_new_tokens=6)
    got = decoder.generate(prompts, visual, sampling)
    want = pipe.decoder.generate(prompts, visual, sampling)
    assert isinstance(pipe.decoder, TransformersDecoder)
    assert got.ids == want.ids
    for req, p, r in zip(_EmulatedLLM.requests, prompts, rows):
        assert req["prompt"] == p.text and req["prompt"].count("<image>") == 1
        assert not req["prompt"].startswith("<s>"), "the processor's tokenizer adds the BOS"
        [sent] = req["multi_modal_embeddings"]["image"]
        assert sent.shape == r.embeddings.shape and torch.equal(sent, r.embeddings)


def test_tensorrt_llm_api_refuses_a_prompt_whose_image_tokens_do_not_match(pipes, checkpoint, monkeypatch, rng):
    fake = types.ModuleType("tensorrt_llm")
    fake.LLM, fake.SamplingParams = _EmulatedLLM, _SamplingParams
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    pipe = pipes["apet"]
    decoder = TensorRTLLMAPIDecoder(checkpoint, image_token="<image>", max_length=4096, device="cpu")
    [rows] = pipe.encode(_images(rng, {"tall": SIZES["tall"]})["tall"])
    prompt = pipe.assemble(PROMPT, [rows])
    two = type(prompt)(prompt.input_ids, prompt.image_slots, prompt.text + " <image>", prompt.rows)
    with pytest.raises(ValueError, match="TensorRT-LLM expands one per image"):
        decoder.requests([two], [[rows.embeddings]])


def test_prompt_table_takes_llava_next_row_counts(pipes, hf_model, rng):
    """TensorRT-LLM's prompt-table lookup (an id >= vocab reads row (id - vocab) + task * R of the
    table; tensorrt_llm/layers/embedding.py PromptTuningEmbedding), emulated: per request the same
    logits as the inputs_embeds path, for three images of different row counts in one batch."""
    pipe = pipes["apet"]
    images = list(_images(rng, {k: SIZES[k] for k in ("square", "wide", "very wide")}).values())
    rows = pipe.encode(images)
    assert len({r.num_rows for r in rows}) == 3
    prompts = [pipe.assemble(PROMPT, [r], i) for i, r in enumerate(rows)]
    visual = [[r.embeddings] for r in rows]
    lm = hf_model
    vocab = lm.config.text_config.vocab_size
    embeds, mask, position_ids = pipe.decoder.build_inputs_embeds(prompts, visual)
    with torch.no_grad():
        reference = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
    inputs = build_prompt_table_inputs(
        [p.input_ids for p in prompts],
        [p.image_slots for p in prompts],
        [r.embeddings for r in rows],
        vocab_size=vocab,
        dtype=torch.float32,
    )
    table = inputs.prompt_table.reshape(-1, inputs.prompt_table.shape[-1])
    embed = lm.get_input_embeddings()
    for b, (ids, task) in enumerate(zip(inputs.batch_input_ids, inputs.tasks)):
        ids = ids.to(torch.int64)
        virtual = ids >= vocab
        x = embed(torch.where(virtual, torch.zeros_like(ids), ids))
        x[virtual] = table[(ids[virtual] - vocab) + task * inputs.task_vocab_size]
        with torch.no_grad():
            logits = lm(inputs_embeds=x[None]).logits[0]
        ref = reference[b, mask.shape[1] - ids.numel() :]
        assert float((logits - ref).abs().max()) < 1e-4, f"request {b} ({rows[b].num_rows} rows)"


def test_auto_decoder_takes_the_llm_api_for_llava_next_where_tensorrt_llm_imports(pipes, monkeypatch):
    from apet_trt.runtime import pipeline

    monkeypatch.setattr(pipeline, "tensorrt_llm_available", lambda: (True, ""))
    pipe = pipes["apet"]
    assert pipeline._choose_decoder(pipe.manifest, "auto", pipe.family) == "tensorrt_llm_api"
    monkeypatch.setattr(pipeline, "tensorrt_llm_available", lambda: (False, "not installed"))
    assert pipeline._choose_decoder(pipe.manifest, "auto", pipe.family) == "transformers"


def test_tensorrt_llm_llm_api_names_exist_where_it_imports():
    pytest.importorskip(
        "tensorrt_llm",
        reason="TensorRT-LLM is not installable on this CPU-only machine (needs an NVIDIA GPU); "
        "this check runs wherever it imports",
    )
    import tensorrt_llm.llmapi.llm as llm_module
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm._torch.models.modeling_llava_next import LlavaNextInputProcessor

    assert {"inputs", "sampling_params", "streaming"} <= set(inspect.signature(LLM.generate_async).parameters)
    params = set(inspect.signature(SamplingParams).parameters)
    assert {"max_tokens", "temperature", "top_k", "top_p", "seed", "end_id", "pad_id"} <= params
    assert "multi_modal_embeddings" in inspect.getsource(llm_module)
    attach = inspect.getsource(LlavaNextInputProcessor.attach_multimodal_embeddings)
    assert "'image'" in attach or '"image"' in attach


def test_tensorrt_llm_api_decoder_runs_where_it_imports(pipes, checkpoint, tmp_path, rng):
    """The real LLM API on the tiny checkpoint (in float16, what its kernels take): greedy ids of the
    same length, and the first token the Transformers decoder's on the same float16 model."""
    pytest.importorskip(
        "tensorrt_llm",
        reason="TensorRT-LLM is not installable on this CPU-only machine (needs an NVIDIA GPU); "
        "this test runs wherever it imports",
    )
    if not torch.cuda.is_available():
        pytest.skip("TensorRT-LLM's LLM API needs a CUDA GPU and torch sees none")
    from transformers import LlavaNextForConditionalGeneration

    half = tmp_path / "fp16"
    LlavaNextForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float16).save_pretrained(half)
    for name in checkpoint.iterdir():
        if not (half / name.name).exists():
            shutil.copy(name, half / name.name)
    pipe = pipes["apet"]
    m = pipe.manifest
    decoder = TensorRTLLMAPIDecoder(
        half, image_token=m.image_token, max_length=4096, dtype=torch.float16,
        eos_token_id=m.llm["eos_token_id"], pad_token_id=m.llm["pad_token_id"],
    )  # fmt: skip
    reference = TransformersDecoder(
        LlavaNextForConditionalGeneration.from_pretrained(str(half), dtype=torch.float16).cuda(),
        image_token_id=m.llm["image_token_id"], pad_token_id=m.llm["pad_token_id"],
        eos_token_id=m.llm["eos_token_id"], max_length=4096,
    )  # fmt: skip
    rows = pipe.encode(list(_images(rng, {k: SIZES[k] for k in ("wide", "tall")}).values()))
    prompts = [pipe.assemble(PROMPT, [r], i) for i, r in enumerate(rows)]
    visual = [[r.embeddings] for r in rows]
    got = decoder.generate(prompts, visual, SamplingConfig(max_new_tokens=4))
    want = reference.generate(prompts, visual, SamplingConfig(max_new_tokens=4))
    assert [ids[:1] for ids in got.ids] == [ids[:1] for ids in want.ids]
    assert got.first_token_ms > 0


# --- the CLI ----------------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_apet_run_json_grid_and_overlay(engines, pipes, tmp_path, rng):
    image = _images(rng, {"wide": SIZES["wide"]})["wide"]
    path = tmp_path / "wide.png"
    image.save(path)
    overlay = tmp_path / "kept.png"
    rc, out, err = _cli(
        "run", "--engine", str(engines["apet"]), "--image", str(path), "--prompt", PROMPT,
        "--max-new-tokens", "3", "--backend", "onnxruntime", "--json", "--overlay", str(overlay),
    )  # fmt: skip
    assert rc == 0, err
    payload = json.loads(out)
    [u] = pipes["full"].encode(path)
    [r] = pipes["apet"].encode(path)
    assert payload["num_patches"] == u.num_rows == r.num_patches
    assert payload["num_kept"] == len(payload["positions"]) == r.num_rows
    assert payload["positions"] == r.positions.tolist()
    assert {"text", "ids", "timings", "backend", "decoder", "overlay"} <= set(payload)

    patch_map = pipes["apet"].family.patch_map(pipes["apet"].preprocess(path), 0)
    assert len(patch_map.boxes) == u.num_rows
    drawn = sum(patch_map.boxes[p] is not None for p in r.positions.tolist())
    r0, r1, c0, c1 = pipes["apet"].family.layout((image.height, image.width)).window
    assert patch_map.grids == [(24, 24), (r1 - r0, c1 - c0)]
    picture = Image.open(overlay)  # the base crop and the image at its anyres resolution, side by side, 2x
    assert picture.size == (2 * 336 + 8 + 2 * (c1 - c0) * 14, 2 * max(336, (r1 - r0) * 14))
    rc, out, err = _cli(
        "run", "--engine", str(engines["apet"]), "--image", str(path), "--prompt", PROMPT,
        "--max-new-tokens", "1", "--backend", "onnxruntime", "--grid",
    )  # fmt: skip
    assert rc == 0, err
    assert out.count("#") == drawn  # every kept patch of every crop, newlines excluded
    assert f"{u.num_rows} -> {r.num_rows} visual tokens" in out


# --- serving ----------------------------------------------------------------------------------


def test_apet_serve_answers_llava_next_requests_of_different_row_counts(engines, pipes, rng):
    """Concurrent requests whose images hand the LLM different row counts, batched by the server:
    each answer equals Pipeline.generate, and usage counts the image's own rows."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from apet_trt.runtime.serve import ServeConfig
    from helpers.servers import data_url, image_message, running_server

    pipe = pipes["apet"]
    images = list(_images(rng, {k: SIZES[k] for k in ("square", "wide", "tall")}).values())
    cfg = ServeConfig(engine=str(engines["apet"]), batch_wait_ms=50, max_images=1)
    with running_server(cfg, pipe=pipe) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(image):
            messages = image_message(PROMPT, data_url(image))
            return client.chat.completions.create(model=state.model, messages=messages, temperature=0, max_tokens=4)

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, images))
    for image, answer in zip(images, answers):
        [ref] = pipe.generate(np.asarray(image), PROMPT, max_new_tokens=4)
        assert answer.choices[0].message.content == ref.text
        assert answer.usage.visual_tokens == ref.num_kept and answer.usage.visual_tokens_uncompressed == ref.num_patches
