"""Qwen2.5-VL end to end (export/models/qwen2_5_vl.py, runtime/families/qwen2_5_vl.py), against
Transformers' own Qwen2_5_VLForConditionalGeneration and the ApET oracle:

  layout     the engine's index inputs the runtime computes from the grids (window order, window
             and image segments) equal Transformers' window index and cu_seqlens, random grids
  rows       --no-apet: images of different sizes in one engine call equal `get_image_features`
             (1e-5); with ApET: kept positions and rows equal apet_ops.compress_reference on those
             Hugging Face features, per image; torch backend == ONNX Runtime
  positions  the prompt's 3-D M-RoPE ids equal Transformers' get_rope_index on the uncompressed
             prompt, the kept rows' columns gathered; several images in one prompt
  decode     greedy ids equal Transformers' generate given the same embeddings and position ids;
             --no-apet through the runtime equals generate from the pixels (its own rope index and
             rope deltas)
  errors     an image with fewer tokens than --keep T is refused with its size; a ratio budget below
             basis too; the engine's TensorRT profile holds every image the processor can make
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.apet_ops.compat import accepted_kwargs, transformers_version
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models.qwen2_5_vl import Qwen25VLExport, layout
from apet_trt.export.presets import load_preset
from apet_trt.runtime.families.qwen2_5_vl import engine_layout, mrope_position_ids

PRESET = "tiny-qwen2.5-vl"
KEEP = 48
RATIO = 0.3
SIZES = [(300, 300), (420, 180), (160, 400), (500, 260)]  # (width, height): 121, 90, 84, 162 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset saved as a checkpoint, its language model's attention sharpened (q and k x 6):
    at random init attention is near uniform and positions would hardly change the greedy ids."""
    loaded = load_preset(PRESET)
    with torch.no_grad():
        for layer in loaded.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    path = tmp_path_factory.mktemp("qwen") / "checkpoint"
    loaded.model.save_pretrained(str(path))
    loaded.processor.save_pretrained(str(path))
    loaded.tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-engines")
    built = {}
    options_by_name = {
        "full": dict(no_apet=True, max_batch=3),
        "keep": dict(keep=KEEP, basis=10),  # the family's seed blend (0.5, the official code's)
        "ratio": dict(keep_ratio=RATIO, basis=10),  # the official budget
    }
    for name, options in options_by_name.items():
        built[name] = root / name
        build(BuildConfig(model=str(checkpoint), out=str(built[name]), **options), quiet=True)
    return built


@pytest.fixture(scope="module")
def pipes(engines):
    return {name: runtime.load(path, backend="onnxruntime") for name, path in engines.items()}


@pytest.fixture
def images(rng):
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()) for w, h in SIZES
    ]


def _hf_features(hf, pipe, pil) -> list[torch.Tensor]:
    family = Qwen25VLExport(hf.config, pipe.family.preprocessor.processor)
    return family.reference_rows(hf, pipe.family.preprocessor.processor, pil)


# -- layout ---------------------------------------------------------------------------------------
def _hf_window_index(hf, grid_thw):
    """Transformers' window index and cu_window_seqlens (5.x: a function in vision_utils; 4.x: a
    method of the vision tower)."""
    visual = getattr(hf.model, "visual", None) or hf.visual
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)
    from transformers.vision_utils import get_vision_window_index

    cfg = visual.config
    return get_vision_window_index(grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)


def test_layout_equals_transformers_window_index_and_segments(hf, rng):
    for _ in range(5):
        n = int(torch.randint(1, 4, (1,), generator=rng))
        grids = [
            (1, 2 * int(torch.randint(1, 20, (1,), generator=rng)), 2 * int(torch.randint(1, 20, (1,), generator=rng)))
            for _ in range(n)
        ]
        ours = engine_layout(grids, merge=2, window_blocks=4)
        window_index, cu_window = _hf_window_index(hf, torch.tensor(grids))
        assert np.array_equal(ours["window_index"], torch.as_tensor(window_index).numpy()), grids
        assert np.array_equal(ours["reverse_index"], torch.argsort(torch.as_tensor(window_index)).numpy())
        lengths = (ours["window_gather"] >= 0).sum(axis=1)
        cu_window = torch.unique_consecutive(torch.as_tensor(cu_window))  # 4.x leaves empty windows' repeats in
        assert np.array_equal(np.cumsum(lengths), cu_window[1:].numpy()), grids
        assert [int(x) for x in (ours["image_gather"] >= 0).sum(axis=1)] == [h * w for _, h, w in grids]
        # gather then scatter is the identity on the sequence; padding is -1 only past each segment
        for g, s in (("window_gather", "window_scatter"), ("image_gather", "image_scatter")):
            flat = ours[g].reshape(-1)
            assert np.array_equal(flat[ours[s]], np.arange(ours[s].size))
        # the export side's own copy (example inputs) computes the same
        theirs = layout(grids, merge=2, window_blocks=4)
        for key, value in ours.items():
            assert np.array_equal(value, theirs[key].numpy()), key


# -- rows -----------------------------------------------------------------------------------------
def test_no_apet_rows_of_images_of_different_sizes_in_one_call_equal_hf_features(hf, pipes, images):
    pipe = pipes["full"]
    batch = pipe.preprocess(images[:3])
    feeds = pipe.family.call_feeds(batch, [0, 1, 2])  # one engine call, three sizes
    out = pipe.vision.run(feeds)
    reference = torch.cat(_hf_features(hf, pipe, images[:3]))
    assert out["embeddings"].shape == reference.shape
    assert float((out["embeddings"] - reference).abs().max()) <= 1e-5
    rows = pipe.encode(images)  # 4 images: calls of up to 3
    for r, ref in zip(rows, _hf_features(hf, pipe, images)):
        assert r.embeddings.shape == ref.shape and float((r.embeddings - ref).abs().max()) <= 1e-5
        assert torch.equal(r.positions, torch.arange(r.num_rows))


@pytest.mark.parametrize("name", ["keep", "ratio"])
def test_apet_positions_and_rows_equal_the_oracle_on_hf_features(hf, pipes, images, name):
    """The blend variant (seed_blend 0.5, the family's default), a fixed T and the official ratio."""
    pipe = pipes[name]
    config = ApetConfig.from_dict(pipe.manifest.apet)
    assert config.seed_blend == 0.5
    rows = pipe.encode(images)
    for r, features in zip(rows, _hf_features(hf, pipe, images)):
        tokens, positions = compress_reference(features[None].double(), config)
        n = features.shape[0]
        assert r.num_patches == n and r.num_rows == (KEEP if name == "keep" else int(RATIO * n))
        assert torch.equal(r.positions, positions[0])
        assert float((r.embeddings - tokens[0].float()).abs().max()) <= 1e-4


def test_torch_backend_equals_onnxruntime(engines, pipes, images):
    for name, path in engines.items():
        torch_pipe = runtime.load(path, backend="torch")
        for a, b in zip(torch_pipe.encode(images), pipes[name].encode(images)):
            assert torch.equal(a.positions, b.positions), name
            assert float((a.embeddings - b.embeddings).abs().max()) <= 1e-5, name


# -- positions ------------------------------------------------------------------------------------
def _hf_rope_index(hf, input_ids, grids):
    """Transformers' get_rope_index on one uncompressed prompt -> [3, L]."""
    model = hf.model
    image = (input_ids == hf.config.image_token_id).int()[None]
    kwargs = accepted_kwargs(
        model.get_rope_index,
        input_ids=input_ids[None],
        image_grid_thw=torch.tensor(grids),
        mm_token_type_ids=image,  # Transformers 5.x marks the image tokens; 4.x finds them itself
        attention_mask=torch.ones_like(input_ids)[None],
    )
    positions, _ = model.get_rope_index(**kwargs)
    return positions[:, 0]


@pytest.mark.parametrize("count", [1, 2])
def test_position_ids_are_the_uncompressed_ids_gathered(hf, pipes, images, count):
    full, comp = pipes["full"], pipes["keep"]
    pil = images[:count]
    text = "".join(f"Image {i}: <|vision_start|><|image_pad|><|vision_end|>\n" for i in range(count)) + "Compare."
    prompt = comp.family.manifest.prompt_template.format(prompt=text).replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "", 1
    )
    uncompressed, kept = full.encode(pil), comp.encode(pil)
    a_full, a_kept = full.assemble(prompt, uncompressed), comp.assemble(prompt, kept)
    grids = [r.extras["grid_thw"] for r in uncompressed]
    reference = _hf_rope_index(hf, a_full.input_ids, grids)
    assert torch.equal(a_full.position_ids, reference)
    # the kept prompt's columns: text tokens map one to one, image i's slots to its kept rows
    columns, offset_full, offset_kept = [], 0, 0
    slots_full, slots_kept = a_full.image_slots.tolist(), a_kept.image_slots.tolist()
    text_full = [i for i in range(a_full.input_ids.numel()) if i not in set(slots_full)]
    text_kept = [i for i in range(a_kept.input_ids.numel()) if i not in set(slots_kept)]
    mapping = dict(zip(text_kept, text_full))
    for u, k in zip(uncompressed, kept):
        for j, p in enumerate(k.positions.tolist()):
            mapping[slots_kept[offset_kept + j]] = slots_full[offset_full + p]
        offset_full += u.num_rows
        offset_kept += k.num_rows
    columns = [mapping[i] for i in range(a_kept.input_ids.numel())]
    assert torch.equal(a_kept.position_ids, reference[:, columns])


@pytest.mark.parametrize("name", ["ratio", "full"])
def test_vllm_plugin_fields_are_the_image_columns_of_the_prompt_ids(pipes, images, name):
    """What `--upstream-format vllm-apet` sends (apet_trt.vllm_plugin) is the Transformers decoder's own
    position ids of the image's slots, less the image's start id: the plugin adds vLLM's start back."""
    pipe = pipes[name]
    for image in images[:2]:
        [rows] = pipe.encode(image)
        fields = pipe.family.vllm_plugin_fields(rows)
        assert set(fields) == {"image_embeds", "apet_mrope_positions", "apet_grid_thw", "apet_num_rows"}
        assert fields["image_embeds"] is rows.embeddings and int(fields["apet_num_rows"]) == rows.num_rows
        assert fields["apet_grid_thw"].tolist() == list(rows.extras["grid_thw"])
        prompt = pipe.assemble("Describe it.", [rows])
        slots = prompt.position_ids[:, prompt.image_slots]  # [3, R]
        start = int(prompt.position_ids[0, prompt.image_slots[0] - 1]) + 1  # one past <|vision_start|>
        assert torch.equal(fields["apet_mrope_positions"].T + start, slots)
        t, h, w = rows.extras["grid_thw"]
        after = int(prompt.position_ids[0, prompt.image_slots[-1] + 1])  # <|vision_end|>
        assert after == start + max(h, w) // 2  # the text continues past the uncompressed grid


def test_apet_encode_writes_the_vllm_plugin_part(engines, pipes, images, tmp_path):
    """`apet encode --format vllm-apet`: vLLM's dict-form part holding the family's plugin fields."""
    import base64
    import io
    import json

    from apet_trt.scripts.cli import main

    path = tmp_path / "image.png"
    images[1].save(path)
    out = tmp_path / "part.json"
    assert (
        main(
            [
                "encode",
                "--engine",
                str(engines["ratio"]),
                "--image",
                str(path),
                "--out",
                str(out),
                "--format",
                "vllm-apet",
            ]
        )
        == 0
    )
    part = json.loads(out.read_text())
    assert part["type"] == "image_embeds"
    got = {k: torch.load(io.BytesIO(base64.b64decode(v)), weights_only=True) for k, v in part["image_embeds"].items()}
    [rows] = pipes["ratio"].encode(Image.open(path).convert("RGB"))
    want = pipes["ratio"].family.vllm_plugin_fields(rows)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_mrope_ids_match_get_rope_index_for_random_grids(hf, rng):
    image_id = hf.config.image_token_id
    for _ in range(5):
        grids = [
            (1, 2 * int(torch.randint(1, 12, (1,), generator=rng)), 2 * int(torch.randint(1, 12, (1,), generator=rng)))
            for _ in range(int(torch.randint(1, 4, (1,), generator=rng)))
        ]
        ids, runs = [], []
        for g in grids:
            ids += [1] * int(torch.randint(0, 6, (1,), generator=rng)) + [hf.config.vision_start_token_id]
            runs.append((len(ids), g, torch.arange(g[1] * g[2] // 4)))
            ids += [image_id] * (g[1] * g[2] // 4)
        ids += [2] * int(torch.randint(1, 6, (1,), generator=rng))
        ids = torch.tensor(ids)
        assert torch.equal(mrope_position_ids(ids.numel(), runs, 2), _hf_rope_index(hf, ids, grids)), grids


# -- decode ---------------------------------------------------------------------------------------
def _hf_generate(hf, inputs_embeds, position_ids, new):
    with torch.no_grad():
        out = hf.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.int64),
            position_ids=position_ids,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=hf.config.text_config.pad_token_id,
        )
    return out[0, -new:].tolist()


def test_greedy_ids_equal_hf_generate_given_the_same_embeddings_and_position_ids(hf, pipes, images):
    if transformers_version() < (5, 0):
        pytest.skip(
            "Transformers 4.x generate cannot continue 3-D position ids it is given (its prepare_inputs_for_generation "
            "slices them as [B, L]); on 4.x the decoder is checked against generate from the pixels "
            "(test_no_apet_pipeline_equals_hf_generate_from_pixels: its own get_rope_index and rope deltas)"
        )
    pipe = pipes["keep"]
    new = 8
    for image in images[:2]:
        [rows] = [pipe.encode([image])]
        a = pipe.assemble("Describe the picture.", rows)
        decoder = pipe.decoder
        embeds, _, position_ids = decoder.build_inputs_embeds([a], [[rows[0].embeddings]])
        assert position_ids.shape == (3, 1, a.input_ids.numel())
        assert torch.equal(position_ids[:, 0], a.position_ids)
        ours = decoder.generate([a], [[rows[0].embeddings]], runtime_sampling(new)).ids[0]
        assert ours == _hf_generate(hf, embeds, position_ids, new)
        # positions matter to this model: renumbering the kept tokens 0..L-1 changes the logits
        renumbered = torch.arange(a.input_ids.numel()).expand(3, 1, -1)
        with torch.no_grad():
            logits = [hf(inputs_embeds=embeds, position_ids=p).logits[0, -1] for p in (position_ids, renumbered)]
        assert float((logits[0] - logits[1]).abs().max()) > 1e-2


def runtime_sampling(new):
    from apet_trt.runtime.decoders import SamplingConfig

    return SamplingConfig(max_new_tokens=new)


def test_no_apet_pipeline_equals_hf_generate_from_pixels(hf, pipes, images):
    """The whole runtime (engine rows, prompt, M-RoPE ids, decoder) against Transformers computing
    everything itself from the pixels: its own tower, get_rope_index and rope deltas."""
    pipe = pipes["full"]
    new = 8
    [result] = pipe.generate(images[1], "What is in the picture?", max_new_tokens=new)
    rows = pipe.encode([images[1]])
    a = pipe.assemble("What is in the picture?", rows)
    pixels = pipe.family.preprocessor.features([images[1]])
    ids = a.input_ids[None]
    kwargs = accepted_kwargs(
        hf.forward,
        mm_token_type_ids=(ids == hf.config.image_token_id).int(),  # Transformers 5.x
    )
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(pixels["pixel_values"]),
            image_grid_thw=torch.from_numpy(pixels["image_grid_thw"]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            **kwargs,
        )
    assert result.ids == out[0, ids.shape[1] :].tolist()


def test_batched_prompts_decode_as_they_do_alone(pipes, images):
    pipe = pipes["keep"]
    together = pipe.generate(images[:3], ["Hi.", "What is in the picture, in detail?", "Name it."], max_new_tokens=5)
    for image, prompt, got in zip(images[:3], ["Hi.", "What is in the picture, in detail?", "Name it."], together):
        [alone] = pipe.generate(image, prompt, max_new_tokens=5)
        assert got.ids == alone.ids and got.positions == alone.positions


# -- errors and limits ----------------------------------------------------------------------------
def test_an_image_smaller_than_the_budget_is_refused_with_its_size(pipes):
    small = Image.new("RGB", (100, 100), (10, 20, 30))  # 4 x 4 blocks = 16 tokens < 48
    with pytest.raises(ValueError, match=r"image 0 \(100x100 px.*N=16 visual tokens, fewer than the T=48"):
        pipes["keep"].encode([small])
    with pytest.raises(ValueError, match="N=16"):
        pipes["keep"].generate(small, "Hi.", max_new_tokens=1)
    # the ratio keeps floor(0.3 * 16) = 4 <= basis: refused, naming the smallest N it takes
    with pytest.raises(ValueError, match=r"image 0 \(100x100 px.*N=16.*N >= 37"):
        pipes["ratio"].encode([small])
    big = Image.new("RGB", (300, 300))
    assert [r.num_rows for r in pipes["ratio"].encode([big])] == [int(0.3 * 121)]


def test_a_ratio_engine_past_tensorrts_topk_limit_is_refused_for_tensorrt():
    """floor(0.3 N) <= 3840 (TensorRT's TopK, K computed at run time): N <= 12803 tokens per image."""
    from apet_trt.export.presets import preset_config

    config, processor, _, _ = preset_config("qwen2.5-vl-7b-arch")
    wide = Qwen25VLExport.configure_processor(processor, max_pixels=13000 * 28 * 28)
    family = Qwen25VLExport(config, wide)
    family.check_apet(ApetConfig(keep_ratio=0.3, seed_blend=0.5))
    assert family.tensorrt_token_limit() == 12803
    with pytest.raises(ValueError, match=r"N <= 12803 tokens per image; build with --max-pixels <= 10037552"):
        family.tensorrt_profile(family.apet, 1, 1)
    family.check_apet(ApetConfig(keep=64))  # a fixed T: K is a constant, N has no limit
    assert family.tensorrt_token_limit() is None and family.tensorrt_profile(family.apet, 1, 1)


def test_tensorrt_profile_holds_every_image_the_processor_makes(checkpoint, pipes):
    family = Qwen25VLExport(*_config_and_processor(checkpoint))
    profile = family.tensorrt_profile(None, 2, 3)
    for name, (lo, opt, hi) in profile.items():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    pipe = pipes["full"]
    for w, h in [(28, 28), (56, 56), (28 * 16, 28 * 16), (28, 28 * 200), (28 * 200, 28), (1000, 700)]:
        batch = pipe.preprocess([Image.new("RGB", (w, h))] * 3)
        feeds = pipe.family.call_feeds(batch, [0, 1, 2])
        for name, value in feeds.items():
            lo, _, hi = profile[name]
            assert all(a <= d <= c for a, d, c in zip(lo, value.shape, hi)), (name, value.shape, (w, h))


def _config_and_processor(checkpoint):
    from transformers import AutoConfig

    from apet_trt.apet_ops.compat import load_image_processor

    return AutoConfig.from_pretrained(str(checkpoint)), load_image_processor(checkpoint)


def test_patch_map_is_the_resized_image_in_28px_blocks(pipes, images):
    pipe = pipes["keep"]
    batch = pipe.preprocess([images[1]])
    pm = pipe.family.patch_map(batch, 0)
    (_, h, w) = batch.items[0]["grid"]
    assert pm.crops[0].shape == (h * 14, w * 14, 3) and pm.grid == (h // 2, w // 2) and pm.patch_size == 28
    resized = images[1].resize((w * 14, h * 14), Image.BICUBIC)
    assert np.abs(pm.crops[0].astype(int) - np.asarray(resized).astype(int)).max() <= 2


def test_manifest_has_the_fields_engine_dir_documents(engines):
    """docs/ENGINE_DIR.md's Qwen2.5-VL block, comments stripped: every key is in a built manifest."""
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "ENGINE_DIR.md").read_text()
    block = re.search(r"## Qwen2\.5-VL \(family `qwen2_5_vl`\).*?```jsonc\n(.*?)```", text, re.S).group(1)
    doc = json.loads(re.sub(r"//[^\n]*", "", block))
    for name in ("ratio", "full"):
        got = json.loads((engines[name] / "manifest.json").read_text())
        for key, value in doc.items():
            assert key in got, (name, key)
            if isinstance(value, dict) and got[key] is not None:  # apet is null without ApET
                assert set(value) <= set(got[key]), (name, key, set(value) - set(got[key]))
        assert [t["name"] for t in got["io"]["inputs"]] == [t["name"] for t in doc["io"]["inputs"]]
    assert json.loads((engines["ratio"] / "manifest.json").read_text())["num_visual_tokens"] is None


def test_pixel_range_options_bound_the_token_axis(tmp_path, capsys):
    from apet_trt.scripts.cli import main

    out = tmp_path / "small"
    rc = main(["build", "--model", PRESET, "--no-apet", "--max-pixels", str(64 * 28 * 28), "--out", str(out)])
    assert rc == 0
    pipe = runtime.load(out, backend="onnxruntime")
    assert pipe.manifest.vision["max_tokens"] == 64
    [rows] = pipe.encode([Image.new("RGB", (900, 600))])  # resized by the saved processor to <= 64 tokens
    assert rows.num_rows <= 64
    capsys.readouterr()
    rc = main(["build", "--model", "tiny-llava", "--max-pixels", "1000", "--out", str(tmp_path / "llava")])
    err = capsys.readouterr().err
    assert rc != 0 and "the llava family takes a fixed image size" in err and err.count("\n") == 1
    assert not (tmp_path / "llava").exists()


def test_onnxruntime_plans_no_memory_patterns_and_shrinks_its_arena_for_varying_token_axes(pipes, tmp_path):
    """ONNX Runtime plans memory per input shape; with token counts that change per call those plans
    pile up (8 blocks of Qwen2.5-VL-7B's tower, two images: 5.0 GB with them, 2.4 GB without), so a
    dynamic-token engine runs without them and a batch-only one (LLaVA-1.5) keeps them."""
    from apet_trt.runtime.backends.onnxruntime import ARENA_SHRINKAGE
    from helpers.engines import build_engine_dir

    vision = pipes["full"].vision
    assert vision.session.get_session_options().enable_mem_pattern is False
    llava = runtime.load(build_engine_dir(tmp_path / "llava"), backend="onnxruntime")
    assert llava.vision.session.get_session_options().enable_mem_pattern is True
    # and the arena goes back after every call (the 7B tower held 11.7 GB after one 1,591-token
    # image, 3.1 GB with this); a fixed-shape engine keeps it
    assert vision.run_options.get_run_config_entry(ARENA_SHRINKAGE) == "cpu:0"
    with pytest.raises(RuntimeError):
        llava.vision.run_options.get_run_config_entry(ARENA_SHRINKAGE)


def test_a_manifest_with_a_bad_family_field_is_refused_naming_it(engines, tmp_path):
    import json
    import shutil

    from apet_trt.runtime.manifest import ManifestError

    bad = tmp_path / "bad"
    shutil.copytree(engines["keep"], bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["qwen2_5_vl"]["images_per_call"] = 0
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"qwen2_5_vl\.images_per_call: must be in 1\.\.4096, got 0"):
        runtime.load(bad, backend="onnxruntime")
