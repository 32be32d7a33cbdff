"""Qwen3-VL end to end (export/models/qwen3_vl.py, runtime/families/qwen3_vl.py), against
Transformers' own Qwen3VLForConditionalGeneration, the ApET oracle and numpy:

  layout     the engine's index inputs computed from the grids (engine_format: rotary positions, the
             position table's bilinear taps, attention segments) equal Transformers' vision_utils,
             random grids
  rows       --no-apet: images of different sizes in one engine call equal `get_image_features`,
             main rows and every DeepStack level (max |diff| printed); with ApET: kept positions and
             main rows equal apet_ops.compress_reference on those features, each level's kept rows
             equal the level's features gathered and merged with the main selection's groups (numpy);
             torch backend == ONNX Runtime
  positions  the prompt's 3-D M-RoPE ids equal Qwen3-VL's get_rope_index on the uncompressed prompt,
             the kept rows' columns gathered
  decode     greedy ids equal Transformers' generate given the same ids, main rows, DeepStack rows
             and position ids (its `mm_encoder_outputs`); the DeepStack rows change the logits;
             --no-apet through the runtime equals generate from the pixels
  handoff    vLLM's layout: rows [T, H * (1 + L)] with a grid of T merge blocks, and back
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.apet_ops.reference import decide
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models.qwen3_vl import Qwen3VLExport
from apet_trt.export.presets import load_preset, preset_config
from apet_trt.runtime.families.qwen2_5_vl import mrope_position_ids
from apet_trt.runtime.families.qwen3_vl import compact_grid, engine_layout

PRESET = "tiny-qwen3-vl"
KEEP = 40
RATIO = 0.3
SIZES = [(300, 300), (420, 180), (160, 400), (500, 260)]  # (width, height): 81, 78, 60, 128 tokens
LEVELS = 3
HIDDEN = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset saved as a checkpoint, its language model's attention sharpened (q and k x 6)
    so that positions and DeepStack rows move the greedy ids."""
    loaded = load_preset(PRESET)
    with torch.no_grad():
        for layer in loaded.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    path = tmp_path_factory.mktemp("qwen3") / "checkpoint"
    loaded.model.save_pretrained(str(path))
    loaded.processor.save_pretrained(str(path))
    loaded.tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-engines")
    options_by_name = {
        "full": dict(no_apet=True, max_batch=3),
        "keep": dict(keep=KEEP, basis=10),  # the family's seed blend (0.5, the official Qwen2.5-VL code's)
        "ratio": dict(keep_ratio=RATIO, basis=10),  # the official budget
    }
    built = {}
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


def _hf_features(hf, pipe, pil):
    """Transformers' get_image_features: per image (main [N, H], levels [L, N, H])."""
    out = pipe.family.preprocessor.processor(images=pil, return_tensors="pt")
    with torch.no_grad():
        f = hf.model.get_image_features(out["pixel_values"], out["image_grid_thw"], return_dict=True)
    return [
        (m.float(), torch.stack([lvl[i] for lvl in f.deepstack_features]).float())
        for i, m in enumerate(f.pooler_output)
    ]


def _split(rows):
    """VisualRows.embeddings [R, H * (1 + L)] -> (main [R, H], levels [L, R, H])."""
    e = rows.embeddings
    return e[:, :HIDDEN], torch.stack(e[:, HIDDEN:].split(HIDDEN, dim=-1))


# -- layout ---------------------------------------------------------------------------------------
def test_layout_equals_transformers_vision_utils(hf, rng):
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    for _ in range(5):
        grids = [
            (1, 2 * int(torch.randint(1, 40, (1,), generator=rng)), 2 * int(torch.randint(1, 40, (1,), generator=rng)))
            for _ in range(int(torch.randint(1, 4, (1,), generator=rng)))
        ]
        thw = torch.tensor(grids)
        ours = engine_layout(grids, merge=2, side=48)
        assert np.array_equal(ours["patch_positions"], get_vision_position_ids(thw, 2).numpy()), grids
        indices, weights = get_vision_interpolation_indices_and_weights(
            thw, num_grid_per_side=48, mode="bilinear", align_corners=True, spatial_merge_size=2
        )
        assert np.array_equal(ours["interp_indices"], indices.numpy()), grids
        assert np.abs(ours["interp_weights"] - weights.numpy()).max() <= 1e-6, grids
        lengths = (ours["image_gather"] >= 0).sum(axis=1)
        assert np.array_equal(np.cumsum(lengths), get_vision_cu_seqlens(thw)[1:].numpy()), grids
        flat = ours["image_gather"].reshape(-1)
        assert np.array_equal(flat[ours["image_scatter"]], np.arange(ours["image_scatter"].size))


# -- rows -----------------------------------------------------------------------------------------
def test_no_apet_rows_and_every_deepstack_level_equal_hf_features(hf, pipes, images):
    pipe = pipes["full"]
    batch = pipe.preprocess(images[:3])
    out = pipe.vision.run(pipe.family.call_feeds(batch, [0, 1, 2]))  # one engine call, three sizes
    reference = _hf_features(hf, pipe, images[:3])
    main = torch.cat([m for m, _ in reference])
    levels = torch.cat([lv for _, lv in reference], dim=1)
    assert out["embeddings"].shape == main.shape and out["deepstack"].shape == levels.shape == (LEVELS, *main.shape)
    diffs = [float((out["embeddings"] - main).abs().max())]
    diffs += [float((out["deepstack"][i] - levels[i]).abs().max()) for i in range(LEVELS)]
    print(f"--no-apet max |diff| vs get_image_features: main {diffs[0]:.2e}, DeepStack levels {diffs[1:]}")
    assert max(diffs) <= 1e-5
    for r, (m, lv) in zip(pipe.encode(images), _hf_features(hf, pipe, images)):  # 4 images: calls of up to 3
        got_main, got_levels = _split(r)
        assert float((got_main - m).abs().max()) <= 1e-5 and float((got_levels - lv).abs().max()) <= 1e-5
        assert torch.equal(r.positions, torch.arange(r.num_rows))


@pytest.mark.parametrize("name", ["keep", "ratio"])
def test_apet_keeps_the_oracles_tokens_and_the_same_groups_at_every_level(hf, pipes, images, name):
    """Positions and main rows: apet_ops.compress_reference on Transformers' main features. Levels: an
    independent numpy recomputation from the oracle's decisions on the main rows (kept positions, seed
    slots, blend 0.5) and merge groups recomputed here (cosine on the main rows): each level's kept
    rows are its own features gathered, blended and averaged over those groups."""
    pipe = pipes[name]
    config = ApetConfig.from_dict(pipe.manifest.apet)
    assert config.seed_blend == 0.5 and config.merge
    worst = 0.0
    for r, (main, levels) in zip(pipe.encode(images), _hf_features(hf, pipe, images)):
        n = main.shape[0]
        tokens, positions = compress_reference(main[None].double(), config)
        assert r.num_patches == n and r.num_rows == (KEEP if name == "keep" else int(RATIO * n))
        assert torch.equal(r.positions, positions[0])
        got_main, got_levels = _split(r)
        assert float((got_main - tokens[0].float()).abs().max()) <= 1e-4
        dec = decide(main.double(), config)
        kept = r.positions.tolist()
        candidates = [p for p in kept if p not in dec.seed_of_slot]
        x = main.double().numpy()
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        groups: dict[int, list[int]] = {c: [] for c in candidates}
        for i in sorted(set(range(n)) - set(kept)):
            groups[candidates[int(np.argmax(unit[candidates] @ unit[i]))]].append(i)
        for level in range(LEVELS):
            y = levels[level].double().numpy()
            want = {p: y[p].copy() for p in kept}
            for p, j in dec.seed_of_slot.items():
                want[p] = 0.5 * y[dec.seeds[j]] + 0.5 * y[p]
            for c, members in groups.items():
                want[c] = (want[c] + y[members].sum(axis=0)) / (1 + len(members))
            diff = np.abs(got_levels[level].double().numpy() - np.stack([want[p] for p in kept])).max()
            worst = max(worst, float(diff))
    print(f"{name}: DeepStack kept rows vs numpy (main selection's groups), max |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_torch_backend_equals_onnxruntime(engines, pipes, images):
    for name, path in engines.items():
        torch_pipe = runtime.load(path, backend="torch")
        for a, b in zip(torch_pipe.encode(images), pipes[name].encode(images)):
            assert torch.equal(a.positions, b.positions), name
            assert a.embeddings.shape == b.embeddings.shape == (a.num_rows, HIDDEN * (1 + LEVELS)), name
            assert float((a.embeddings - b.embeddings).abs().max()) <= 1e-5, name


# -- positions ------------------------------------------------------------------------------------
def _hf_rope_index(hf, input_ids, grids):
    """Qwen3-VL's own get_rope_index on one uncompressed prompt -> [3, L]."""
    types = (input_ids == hf.config.image_token_id).int()[None]
    positions, _ = hf.model.get_rope_index(input_ids[None], mm_token_type_ids=types, image_grid_thw=torch.tensor(grids))
    return positions[:, 0]


def test_mrope_ids_match_qwen3_get_rope_index_for_random_grids(hf, rng):
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


def test_kept_prompt_positions_are_the_uncompressed_ids_gathered(hf, pipes, images):
    full, comp = pipes["full"], pipes["keep"]
    pil = images[:2]
    text = "".join(f"Image {i}: <|vision_start|><|image_pad|><|vision_end|>\n" for i in range(2)) + "Compare."
    prompt = comp.manifest.prompt_template.format(prompt=text).replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "", 1
    )
    uncompressed, kept = full.encode(pil), comp.encode(pil)
    a_full, a_kept = full.assemble(prompt, uncompressed), comp.assemble(prompt, kept)
    reference = _hf_rope_index(hf, a_full.input_ids, [r.extras["grid_thw"] for r in uncompressed])
    assert torch.equal(a_full.position_ids, reference)
    slots_full, slots_kept = a_full.image_slots.tolist(), a_kept.image_slots.tolist()
    text_full = [i for i in range(a_full.input_ids.numel()) if i not in set(slots_full)]
    text_kept = [i for i in range(a_kept.input_ids.numel()) if i not in set(slots_kept)]
    mapping = dict(zip(text_kept, text_full))
    offset_full = offset_kept = 0
    for u, k in zip(uncompressed, kept):
        for j, p in enumerate(k.positions.tolist()):
            mapping[slots_kept[offset_kept + j]] = slots_full[offset_full + p]
        offset_full, offset_kept = offset_full + u.num_rows, offset_kept + k.num_rows
    assert torch.equal(a_kept.position_ids, reference[:, [mapping[i] for i in range(a_kept.input_ids.numel())]])


# -- decode ---------------------------------------------------------------------------------------
def _hf_generate_from_rows(hf, input_ids, rows, position_ids, new):
    """Transformers' generate given the prompt ids, the main rows and DeepStack rows of its image
    slots (its pre-encoded `mm_encoder_outputs`) and the position ids."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    main, levels = rows[:, :HIDDEN], rows[:, HIDDEN:].split(HIDDEN, dim=-1)
    encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=(main,), deepstack_features=[(lv,) for lv in levels])
    with torch.no_grad():
        out = hf.generate(
            input_ids=input_ids[None],
            attention_mask=torch.ones_like(input_ids)[None],
            position_ids=position_ids[:, None],
            mm_encoder_outputs={"image": encoded},
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=hf.config.text_config.pad_token_id,
        )
    return out[0, input_ids.numel() :].tolist()


def test_greedy_ids_equal_hf_generate_given_the_same_rows_deepstack_and_positions(hf, pipes, images):
    from apet_trt.apet_ops.compat import transformers_version
    from apet_trt.runtime.decoders import SamplingConfig

    if transformers_version() < (5, 0):
        pytest.skip("generate takes pre-encoded image features (mm_encoder_outputs) from Transformers 5 on")

    pipe, new = pipes["ratio"], 8
    for image in images[:2]:
        [rows] = pipe.encode([image])
        a = pipe.assemble("Describe the picture.", [rows])
        ours = pipe.decoder.generate([a], [[rows.embeddings]], SamplingConfig(max_new_tokens=new)).ids[0]
        assert ours == _hf_generate_from_rows(hf, a.input_ids, rows.embeddings, a.position_ids, new)
        # the DeepStack rows reach the model: without them (zeros) the logits change
        flat = rows.embeddings.clone()
        flat[:, HIDDEN:] = 0
        with torch.no_grad():
            logits = [pipe.decoder.prefill([a], [[e]])[0] for e in (rows.embeddings, flat)]
        assert float((logits[0] - logits[1]).abs().max()) > 1e-3


def test_no_apet_pipeline_equals_hf_generate_from_pixels(hf, pipes, images):
    """The whole runtime (engine rows and DeepStack levels, prompt, M-RoPE ids, decoder) against
    Transformers computing everything itself from the pixels."""
    pipe, new = pipes["full"], 8
    [result] = pipe.generate(images[1], "What is in the picture?", max_new_tokens=new)
    a = pipe.assemble("What is in the picture?", pipe.encode([images[1]]))
    pixels = pipe.family.preprocessor.features([images[1]])
    ids = a.input_ids[None]
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(pixels["pixel_values"]),
            image_grid_thw=torch.from_numpy(pixels["image_grid_thw"]),
            mm_token_type_ids=(ids == hf.config.image_token_id).int(),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
        )
    assert result.ids == out[0, ids.shape[1] :].tolist()


def test_batched_prompts_decode_as_they_do_alone(pipes, images):
    pipe = pipes["ratio"]
    prompts = ["Hi.", "What is in the picture, in detail?", "Name it."]
    together = pipe.generate(images[:3], prompts, max_new_tokens=5)
    for image, prompt, got in zip(images[:3], prompts, together):
        [alone] = pipe.generate(image, prompt, max_new_tokens=5)
        assert got.ids == alone.ids and got.positions == alone.positions


# -- handoff (vLLM's Qwen3-VL image_embeds layout) ------------------------------------------------
def test_handoff_is_vllms_layout_and_comes_back(pipes, images):
    pipe = pipes["ratio"]
    for r in pipe.encode(images):
        fields = pipe.family.handoff_fields(r)
        assert set(fields) == {"image_embeds", "image_grid_thw"}
        assert fields["image_embeds"].shape == (r.num_rows, HIDDEN * (1 + LEVELS))  # [tokens, hidden * (1 + levels)]
        assert fields["image_grid_thw"].shape == (3,)  # one item's grid (vLLM batches items: [3], not [1, 3])
        t, h, w = fields["image_grid_thw"].tolist()
        assert t == 1 and h % 2 == 0 and w % 2 == 0 and h * w // 4 == r.num_rows  # vLLM splits rows by grid
        back = pipe.family.rows_from_handoff(fields)
        assert torch.equal(back.embeddings, r.embeddings) and back.extras["grid_thw"] == (1, h, w)
    assert compact_grid(24, 2) == (1, 8, 12) and compact_grid(13, 2) == (1, 2, 26)
    bad = {"image_embeds": torch.zeros(24, HIDDEN * 4), "image_grid_thw": torch.tensor([[1, 8, 10]])}
    with pytest.raises(ValueError, match=r"image_grid_thw \[1, 8, 10\] does not describe 24 rows"):
        pipe.family.rows_from_handoff(bad)
    narrow = {"image_embeds": torch.zeros(24, HIDDEN), "image_grid_thw": torch.tensor([[1, 8, 12]])}
    with pytest.raises(ValueError, match=r"image_embeds of width 64; this engine's rows are 256 wide"):
        pipe.family.rows_from_handoff(narrow)


def test_apet_serve_answers_images_and_takes_its_own_handoff_parts(engines, pipes, images):
    """`apet serve` on a Qwen3-VL engine: an image answers as Pipeline.generate does; an image_embeds
    part (rows [T, H * (1 + L)] and the compact grid, what `apet encode` writes) is taken at the
    family's row width and answers as the DeepStack decoder on those rows."""
    import openai

    from apet_trt.runtime.decoders import SamplingConfig
    from apet_trt.runtime.serve import ServeConfig
    from apet_trt.runtime.serve.payload import encode_part
    from helpers.servers import data_url, image_message, running_server

    pipe = pipes["ratio"]
    with running_server(ServeConfig(engine=str(engines["ratio"]), batch_wait_ms=20), pipe=pipe) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = dict(model=state.model, temperature=0, max_tokens=6)
        r = client.chat.completions.create(messages=image_message("What is it?", data_url(images[0])), **ask)
        [ref] = pipe.generate(images[0], "What is it?", max_new_tokens=6)
        assert r.choices[0].message.content == ref.text
        [rows] = pipe.encode([images[1]])
        fields = pipe.family.handoff_fields(rows)
        part = encode_part(fields)
        content = [part, {"type": "text", "text": "What is it?"}]
        r = client.chat.completions.create(messages=[{"role": "user", "content": content}], **ask)
        back = pipe.family.rows_from_handoff(fields)
        a = pipe.assemble("What is it?", [back])
        ids = pipe.decoder.generate([a], [[back.embeddings]], SamplingConfig(max_new_tokens=6)).ids[0]
        assert r.choices[0].message.content == pipe.tokenizer.decode(ids, skip_special_tokens=True)
        narrow = encode_part({**fields, "image_embeds": fields["image_embeds"][:, :HIDDEN]})
        with pytest.raises(openai.BadRequestError, match="width 64"):
            content = [narrow, {"type": "text", "text": "What is it?"}]
            client.chat.completions.create(messages=[{"role": "user", "content": content}], **ask)


def test_patch_map_is_the_resized_image_in_32px_blocks(pipes, images):
    pipe = pipes["keep"]
    batch = pipe.preprocess([images[1]])
    pm = pipe.family.patch_map(batch, 0)
    (_, h, w) = batch.items[0]["grid"]
    assert pm.crops[0].shape == (h * 16, w * 16, 3) and pm.grid == (h // 2, w // 2) and pm.patch_size == 32
    resized = images[1].resize((w * 16, h * 16), Image.BICUBIC)
    assert np.abs(pm.crops[0].astype(int) - np.asarray(resized).astype(int)).max() <= 2


def test_upstream_route_is_the_plugin_or_vllm_with_the_grid_positions_opt_in(pipes):
    family = pipes["ratio"].family
    assert family.upstream_route("vllm-apet") == "image_embeds"  # apet-trt's plugin: exact, no opt-in
    with pytest.raises(ValueError, match=r"^--upstream: vLLM's own Qwen3-VL places image rows on a grid's M-RoPE"):
        family.upstream_route("vllm")
    assert family.upstream_route("vllm", grid_positions=True) == "image_embeds"
    with pytest.raises(ValueError, match=r"--upstream-format trtllm: .* use --upstream-format vllm-apet"):
        family.upstream_route("trtllm", grid_positions=True)


def test_apet_encode_writes_the_vllm_plugin_part_with_the_prompts_own_ids(engines, pipes, images, tmp_path):
    """`apet encode --format vllm-apet` (apet_trt.vllm_plugin's ApetQwen3VLForConditionalGeneration): the
    wide rows [R, H * (1 + L)] as they are and each row's id = the Transformers decoder's position ids of
    the image's slots less the image's start; the text after the image continues past the uncompressed grid."""
    import base64
    import io
    import json

    from apet_trt.scripts.cli import main

    pipe = pipes["ratio"]
    path, out = tmp_path / "image.png", tmp_path / "part.json"
    images[1].save(path)
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
    part = json.loads(out.read_text())["image_embeds"]
    got = {k: torch.load(io.BytesIO(base64.b64decode(v)), weights_only=True) for k, v in part.items()}
    [rows] = pipe.encode(Image.open(path).convert("RGB"))
    assert set(got) == {"image_embeds", "apet_mrope_positions", "apet_grid_thw", "apet_num_rows"}
    assert rows.num_rows < rows.num_patches and got["image_embeds"].shape == (rows.num_rows, pipe.family.row_width)
    assert torch.equal(got["image_embeds"].float(), rows.embeddings.float().to(got["image_embeds"].dtype).float())
    assert int(got["apet_num_rows"]) == rows.num_rows and got["apet_grid_thw"].tolist() == list(rows.extras["grid_thw"])
    prompt = pipe.assemble("Describe it.", [rows])
    start = int(prompt.position_ids[0, prompt.image_slots[0] - 1]) + 1  # one past <|vision_start|>
    assert torch.equal(got["apet_mrope_positions"].T + start, prompt.position_ids[:, prompt.image_slots])
    _, h, w = rows.extras["grid_thw"]
    assert int(prompt.position_ids[0, prompt.image_slots[-1] + 1]) == start + max(h, w) // 2


# -- errors, limits, manifest ---------------------------------------------------------------------
def test_an_image_smaller_than_the_budget_is_refused_with_its_size(pipes):
    small = Image.new("RGB", (128, 128), (10, 20, 30))  # 4 x 4 blocks of 32 px = 16 tokens < 40
    with pytest.raises(ValueError, match=r"image 0 \(128x128 px.*N=16 visual tokens, fewer than the T=40"):
        pipes["keep"].encode([small])
    with pytest.raises(ValueError, match=r"image 0 \(128x128 px.*N=16.*N >= 37"):
        pipes["ratio"].encode([small])


def test_the_8b_arch_preset_is_the_published_configuration():
    """Constructed only (never built here: 7B-class)."""
    config, processor, _, _ = preset_config("qwen3-vl-8b-arch")
    v, t = config.vision_config, config.text_config
    assert (v.depth, v.hidden_size, v.num_heads, v.out_hidden_size, list(v.deepstack_visual_indexes)) == (
        27,
        1152,
        16,
        4096,
        [8, 16, 24],
    )
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.vocab_size) == (
        4096,
        36,
        8,
        128,
        151936,
    )
    assert config.image_token_id == 151655
    family = Qwen3VLExport(config, processor)
    assert (family.min_tokens, family.max_tokens, family.levels, family.side) == (256, 2048, 3, 48)
    family.check_apet(ApetConfig(keep_ratio=0.3, seed_blend=0.5))
    assert family.tensorrt_token_limit() == 12803 and family.tensorrt_profile(family.apet, 1, 1)


def test_manifest_has_the_fields_the_family_doc_documents_and_bad_ones_are_refused(engines, tmp_path):
    import re
    import shutil
    from pathlib import Path

    from apet_trt.runtime.manifest import ManifestError

    text = (Path(__file__).resolve().parents[2] / "docs" / "families" / "qwen3_vl.md").read_text()
    doc = json.loads(re.sub(r"//[^\n]*", "", re.search(r"```jsonc\n(.*?)```", text, re.S).group(1)))
    for name in ("ratio", "full"):
        got = json.loads((engines[name] / "manifest.json").read_text())
        for key, value in doc.items():
            assert key in got, (name, key)
            if isinstance(value, dict) and got[key] is not None:
                assert set(value) <= set(got[key]), (name, key, set(value) - set(got[key]))
        assert [t["name"] for t in got["io"]["outputs"]] == ["embeddings", "positions", "deepstack"]
    bad = tmp_path / "bad"
    shutil.copytree(engines["keep"], bad)
    data = json.loads((bad / "manifest.json").read_text())
    data["qwen3_vl"]["deepstack_visual_indexes"] = [8, -1]
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"qwen3_vl\.deepstack_visual_indexes\[1\]: must be in 0\.\.4096"):
        runtime.load(bad, backend="onnxruntime")
    # the engine outputs the family declares (engine_format FACTS.outputs): exactly these, typed
    good = json.loads((engines["keep"] / "manifest.json").read_text())
    for outputs, message in (
        (good["io"]["outputs"][:2], r"io\.outputs: must be 'embeddings' and 'positions' and 'deepstack'"),
        ([*good["io"]["outputs"], {"name": "extra", "dtype": "float32", "shape": [1]}], r"io\.outputs: must be"),
        ([*good["io"]["outputs"][:2], {**good["io"]["outputs"][2], "dtype": "float16"}], r"deepstack must be float32"),
    ):
        (bad / "manifest.json").write_text(json.dumps({**good, "io": {**good["io"], "outputs": outputs}}))
        with pytest.raises(ManifestError, match=message):
            runtime.load(bad, backend="onnxruntime")


def test_start_random_is_refused_before_anything_is_built(tmp_path):
    """Qwen3-VL's engine has no per-image `start` input yet: --start random is refused in one line,
    before any weights are built and without an --out directory left behind."""
    out = tmp_path / "q3"
    with pytest.raises(ValueError, match=r"--start random: the qwen3_vl family's vision engine takes no per-image"):
        build(BuildConfig(model="tiny-qwen3-vl", out=str(out), keep_ratio=0.3, start="random"), quiet=True)
    assert not out.exists()
