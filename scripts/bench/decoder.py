"""The decoder stage: what T visual rows cost the language model, measured through the runtime's own
TransformersDecoder - the code `runtime.load` and `apet run` use.

The model is the engine's own language model: the text config of the Transformers config its
manifest names (`decoder.transformers`: hf/config.json for a preset, the checkpoint's config.json
for a path), built through Transformers' Auto classes - `AutoModelForCausalLM`, or for a text config
that maps to no causal-LM class (Qwen2.5-VL's M-RoPE text model) `AutoModel` plus a linear head over
the vocabulary - with seeded random weights: the shapes decide the time, not the values. On a CPU
only the first layers run (default 2, a layer override the report states); on a GPU all of them.

The inputs at each T are what a user's request gives the decoder: the bench prompt assembled by the
engine's own prompt assembler around one image (or video) of T rows, with the family's position ids for those
rows (`family.position_ids`, as `Pipeline.assemble` adds them). For 1-D families such as LLaVA they
are None and the decoder numbers the tokens 0..L-1 itself; a family with its own [P, L] ids (such
as Qwen2.5-VL's 3-D M-RoPE) has them passed to the model in prefill and continued in decode. The
rows: the compressed engine's own at its T, the uncompressed engine's at N, and at any other T the
uncompressed rows at T evenly spaced positions (as many rows, of the same kind and with their
positions, as a compressor keeping T would hand over).

Per T, `TransformersDecoder.generate` of new_tokens + 1 tokens, interleaved over T: prefill is the
decoder's own time to the first token (the prompt embedded with the rows scattered in, one forward
over it, the first token), decode the new_tokens steps after it (no stop at EOS). The KV cache: the
bytes of the full model in float16 from the config (2 x layers x kv heads x head dim x context x 2
bytes x batch), and the bytes the run's cache held after prefill (observed on the decoder's own
prefill forward).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import BenchConfig, log
from .measure import Memory, measure_stages, ratio

KV_DTYPE_FULL_MODEL, KV_BYTES_PER_VALUE = "float16", 2
COMPRESSED_ROWS = "the compressed engine's"
UNCOMPRESSED_ROWS = "the uncompressed engine's"
SPACED_ROWS = "uncompressed rows at evenly spaced positions"


# -- the model ----------------------------------------------------------------------------------


def text_config(manifest) -> tuple[Any, str]:
    """The engine's language-model config (the text config of the Transformers config the manifest
    names) and the file it was read from."""
    from transformers import AutoConfig

    path = manifest.transformers_config() or manifest.transformers_checkpoint() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Transformers config the manifest names does not exist")
    return AutoConfig.from_pretrained(str(path.parent)).get_text_config(), str(path)


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def kv_cache_bytes(config, context: int, batch: int = 1, bytes_per_value: int = KV_BYTES_PER_VALUE) -> int:
    """Keys and values of every layer of the full model for `context` tokens."""
    return 2 * int(config.num_hidden_layers) * kv_heads(config) * head_dim(config) * context * bytes_per_value * batch


def cache_nbytes(cache) -> int:
    """Bytes a KV cache object holds (Transformers 5 `layers[i].keys/values`, 4.x `key_cache/value_cache`)."""
    tensors = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:  # legacy tuple of (k, v) per layer
        tensors = [t for kv in cache for t in kv]
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


@dataclass
class _LMOutput:
    logits: torch.Tensor
    cache: Any


class TextModelWithHead(torch.nn.Module):
    """A text model (AutoModel) and a linear head over its vocabulary: the causal LM of a text config
    Transformers maps to no *ForCausalLM class (Qwen2.5-VL's text model: its head sits in the VLM).
    Takes what TransformersDecoder passes: inputs_embeds or input_ids, attention_mask, position_ids
    ([B, L] or a family's [P, B, L], handed to the text model as they are), the cache, logits_to_keep."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_decoder(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> _LMOutput:
        from apet_trt.apet_ops.compat import cache_kwarg, output_cache

        out = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_kwarg(self.model.forward): cache},
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        return _LMOutput(self.lm_head(hidden), output_cache(out))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class LanguageModel:
    """The benchmark's language model before it is built: the full model's text config, and where
    and how much of it runs."""

    config: Any  # the full model's text config
    source: str  # the file it came from
    device: str
    dtype: torch.dtype
    layers: int  # layers run; the full model has config.num_hidden_layers

    @classmethod
    def for_engine(cls, manifest, *, layers: int | None = None, device: str = "auto") -> LanguageModel:
        config, source = text_config(manifest)
        return cls.for_config(config, source, layers=layers, device=device)

    @classmethod
    def for_config(cls, config, source: str, *, layers: int | None = None, device: str = "auto") -> LanguageModel:
        """Device auto: CUDA when present. float16 on a GPU, float32 on a CPU. Layers: all on a GPU,
        min(2, all) on a CPU."""
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        full = int(config.num_hidden_layers)
        layers = layers or (full if on_gpu else min(2, full))
        if not 1 <= layers <= full:
            raise ValueError(f"--decoder-layers must be in 1..{full} (the full model's count), got {layers}")
        return cls(config, source, device, torch.float16 if on_gpu else torch.float32, layers)

    @property
    def full_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def model_class(self) -> tuple[type, bool]:
        """(the Transformers class Auto* picks for the text config, whether the bench adds an LM head)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

        kind = type(self.config)
        if kind in MODEL_FOR_CAUSAL_LM_MAPPING:
            return MODEL_FOR_CAUSAL_LM_MAPPING[kind], False
        if kind in MODEL_MAPPING:
            return MODEL_MAPPING[kind], True
        raise ValueError(f"{self.source}: Transformers has no model class for the text config {kind.__name__}")

    def build(self, seed: int = 0) -> torch.nn.Module:
        """`layers` layers of the model, seeded random weights, created directly in the dtype on the
        device (no float32 copy of a 7B model on the GPU); the global RNG is left as it was."""
        from transformers import AutoModel, AutoModelForCausalLM

        from apet_trt.apet_ops.compat import dtype_kwarg

        config = copy.deepcopy(self.config)
        config.num_hidden_layers = self.layers
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
            config.layer_types = config.layer_types[: self.layers]
        _, with_head = self.model_class()
        with torch.random.fork_rng(devices=[]), torch.device(self.device), _default_dtype(self.dtype):
            torch.manual_seed(seed)
            if with_head:
                model = TextModelWithHead(AutoModel.from_config(config, **dtype_kwarg(self.dtype)))
            else:
                model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(self.dtype))
        return model.to(self.dtype).eval()

    def info(self) -> dict:
        """The model's description in the report."""
        c = self.config
        cls, with_head = self.model_class()
        return {
            "class": cls.__name__ + (" + linear LM head" if with_head else ""),
            "config": self.source,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device,
            "model_type": c.model_type,
            "hidden_size": int(c.hidden_size),
            "intermediate_size": getattr(c, "intermediate_size", None),
            "num_attention_heads": int(c.num_attention_heads),
            "num_key_value_heads": kv_heads(c),
            "vocab_size": int(c.vocab_size),
            "head_dim": head_dim(c),
            "layers_run": self.layers,
            "layers_full_model": self.full_layers,
            "layer_override": self.layers != self.full_layers,
        }


def runtime_decoder(model: torch.nn.Module, manifest, lm: LanguageModel):
    """The runtime's Transformers decoder of the engine's family (TransformersDecoder, or the family's
    own, e.g. Qwen3-VL's DeepStack one) over the benchmark's model, never stopping at EOS (every call
    makes exactly the tokens asked for)."""
    from apet_trt.runtime.families import family_for

    return family_for(manifest).transformers_decoder(model, **_decoder_kwargs(manifest, lm))


def _decoder_kwargs(manifest, lm: LanguageModel) -> dict:
    llm = manifest.llm
    return dict(
        image_token_id=int(llm["image_token_id"]),
        pad_token_id=llm.get("pad_token_id"),
        eos_token_id=None,
        max_length=int(getattr(lm.config, "max_position_embeddings", None) or llm["max_position_embeddings"]),
    )


def stage_layer(manifest, lm: LanguageModel) -> int:
    """The layer the LLM stage follows in the layers run: the engine's (`llm_stage.layer`, of the full
    model) scaled to the layer override (16 of 32 -> 1 of 2), so the same share of layers sees the
    vision stage's rows; at least one layer on each side."""
    full, run = lm.full_layers, lm.layers
    if run < 2:
        raise ValueError(f"the engine's LLM stage needs at least 2 decoder layers run (one on each side), got {run}")
    return min(run - 1, max(1, round(int(manifest.llm_stage["layer"]) * run / full)))


def stage_decoder(model: torch.nn.Module, manifest, lm: LanguageModel):
    """The runtime's Stage2Decoder over the benchmark's model, for an engine whose manifest has
    llm_stage: the engine's compressor, at `stage_layer` of the layers run."""
    from apet_trt.apet_ops import ApetConfig
    from apet_trt.runtime.decoders import Stage2Decoder
    from apet_trt.runtime.families import family_for

    stage = {k: v for k, v in manifest.llm_stage.items() if k != "layer"}
    seeded = manifest.random_start
    return Stage2Decoder(
        model,
        layer=stage_layer(manifest, lm),
        config=ApetConfig.from_dict(stage),
        span_rows=family_for(manifest).llm_stage_rows,
        start_seed=None if not seeded else int(seeded["seed"]) + 1,
        **_decoder_kwargs(manifest, lm),
    )


def kv_cache_bytes_staged(config, context: int, context_after: int, layer: int, batch: int = 1) -> int:
    """kv_cache_bytes of the full model when layers < `layer` hold `context` tokens and the others
    `context_after` (the LLM stage's pruned sequence)."""
    full = int(config.num_hidden_layers)
    per_token_layer = kv_cache_bytes(config, 1, batch) // full
    return per_token_layer * (layer * context + (full - layer) * context_after)


# -- the inputs at each T -----------------------------------------------------------------------


@dataclass
class DecoderCase:
    """What the decoder gets at one T: the bench prompt around one medium of T rows, `batch` times."""

    t: int
    rows_source: str
    prompts: list  # AssembledPrompt per request
    visual: list  # per request, one [T, H] tensor

    @property
    def context(self) -> int:
        return int(self.prompts[0].input_ids.numel())


def rows_at(t: int, rows) -> tuple[object, str]:
    """One item's rows at T (rows: the bench medium's MediaRows) and where they come from."""
    from apet_trt.runtime.families import VisualRows

    comp, base = rows.comp_rows[0], rows.base_rows[0]
    if t == comp.num_rows:
        return comp, COMPRESSED_ROWS
    if t == base.num_rows:
        return base, UNCOMPRESSED_ROWS
    keep = torch.arange(t) * base.num_rows // t  # ascending and distinct for t <= N
    kept = VisualRows(base.embeddings[keep], base.positions[keep], base.num_patches, dict(base.extras), base.media)
    return kept, SPACED_ROWS


def with_text_tokens(assembled, k: int):
    """The assembled prompt with k text ids (for --text-tokens, which sets how many, not what they
    say): the ids before the medium's rows are kept as far as k allows, those after them are cut or
    repeated to make up k."""
    ids, slots = assembled.input_ids, assembled.image_slots
    first, last = int(slots[0]), int(slots[-1]) + 1  # one medium: its slots are one contiguous run
    before, after = ids[:first][:k], ids[last:]
    need = k - before.numel()
    filler = after if after.numel() else ids[:first]
    if need > 0 and not filler.numel():
        raise ValueError(f"--text-tokens {k}: the prompt has no text ids to repeat")
    after = filler.repeat(-(-need // max(1, filler.numel())))[:need] if need > 0 else after[:0]
    return replace(
        assembled, input_ids=torch.cat([before, ids[first:last], after]), image_slots=slots - first + before.numel()
    )


def assemble(pipe, prompt: str, rows, text_tokens: int | None = None):
    """The prompt for one medium of `rows`, as `Pipeline.assemble` makes it (the assembler, then the
    family's position ids); with text_tokens, its text ids resized before the positions are made."""
    if text_tokens is None:
        return pipe.assemble(prompt, [rows])
    a = with_text_tokens(pipe.assembler(prompt, [rows.num_rows], 0, [rows.media]), text_tokens)
    ids = pipe.family.position_ids(a.input_ids, a.image_slots, [rows])
    return a if ids is None else replace(a, position_ids=ids)


def decoder_cases(cfg: BenchConfig, pipes: dict, rows, tokens: list[int]) -> dict[int, DecoderCase]:
    """pipes: {"compressed", "baseline"} runtime Pipelines of the two engines (their assemblers and
    families); each T's prompt is made by the engine its rows come from."""
    cases = {}
    for t in tokens:
        r, source = rows_at(t, rows)
        pipe = pipes["compressed" if source == COMPRESSED_ROWS else "baseline"]
        prompt = assemble(pipe, cfg.prompt, r, cfg.text_tokens)
        cases[t] = DecoderCase(t, source, [prompt] * cfg.batch, [[r.embeddings]] * cfg.batch)
    return cases


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Prefill:
    logits: torch.Tensor  # [B, V] float32 at the last prompt position
    cache_bytes: int  # what the KV cache held after the prefill


def observe_prefill(decoder, prompts, visual) -> Prefill:
    """One prefill as the decoder runs it (`generate` of one token), observed on the model's forward:
    the logits at the last position and the bytes of the KV cache it returned."""
    from apet_trt.apet_ops.compat import output_cache
    from apet_trt.runtime.decoders import SamplingConfig

    if getattr(decoder, "llm_stage", False):  # Stage2Decoder runs its layers itself: its own prefill
        with torch.inference_mode():
            logits, state = decoder.prefill(prompts, visual)
        return Prefill(logits.float().clone(), cache_nbytes(state.cache))
    seen = []

    def hook(module, args, output):
        seen.append(Prefill(output.logits[:, -1].float().clone(), cache_nbytes(output_cache(output))))

    handle = decoder.model.register_forward_hook(hook)
    try:
        decoder.generate(prompts, visual, SamplingConfig(max_new_tokens=1))
    finally:
        handle.remove()
    [prefill] = seen  # one new token: the prefill is the only forward
    return prefill


def bench_decoder(cfg: BenchConfig, lm: LanguageModel, pipes: dict, rows, tokens: list[int], memory: Memory) -> dict:
    from apet_trt.runtime.decoders import SamplingConfig

    decoder = pipes["baseline"].decoder  # vision-only rows: the plain decoder (the compressed one may stage)
    staged = pipes["compressed"].decoder if getattr(pipes["compressed"].decoder, "llm_stage", False) else None
    cases = decoder_cases(cfg, pipes, rows, tokens)
    sampling = SamplingConfig(max_new_tokens=cfg.new_tokens + 1)  # the first token, then new_tokens decode steps

    def call(case: DecoderCase, dec=decoder):
        def run():
            out = dec.generate(case.prompts, case.visual, sampling)
            return {"prefill": out.first_token_ms / 1e3, "decode": out.decode_ms / 1e3}

        return run

    candidates = {t: call(c) for t, c in cases.items()}
    stage_case = None
    if staged is not None:  # the engine's own rows through the LLM stage, interleaved with the T points
        comp = rows.comp_rows[0]
        prompt = assemble(pipes["compressed"], cfg.prompt, comp, cfg.text_tokens)
        stage_case = DecoderCase(comp.num_rows, COMPRESSED_ROWS, [prompt] * cfg.batch, [[comp.embeddings]] * cfg.batch)
        candidates["llm_stage"] = call(stage_case, staged)

    log(
        f"decoder: prefill + {cfg.new_tokens} decode steps at T in {tokens} "
        f"({lm.layers} of {lm.full_layers} layers, {lm.device})"
    )
    timed = measure_stages(candidates, repeats=cfg.repeats, warmup=cfg.warmup, desc="decoder")
    observed: dict = {}
    mem = {
        t: memory.measure(
            lambda c=c, t=t, d=d: observed.__setitem__(t, observe_prefill(d, c.prompts, c.visual)),
            cuda=lm.device.startswith("cuda"),
        )
        for t, c, d in [
            *((t, c, decoder) for t, c in cases.items()),
            *((("llm_stage", stage_case, staged),) * bool(staged)),
        ]
    }
    points = []
    for t, c in cases.items():
        prefill, decode = timed[t]["prefill"], timed[t]["decode"]
        per_token = decode["median_s"] / cfg.new_tokens
        points.append(
            {
                "T": t,
                "context": c.context,
                "rows": c.rows_source,
                "prefill": prefill,
                "prefill_ratio_vs_N": ratio(prefill, timed[rows.n]["prefill"]),
                "decode": decode,
                "decode_s_per_token": per_token,
                "decode_tokens_per_s": cfg.batch / per_token,
                "kv_cache_bytes_full_model": kv_cache_bytes(lm.config, c.context, cfg.batch),
                "kv_cache_bytes_at_end_full_model": kv_cache_bytes(lm.config, c.context + cfg.new_tokens, cfg.batch),
                "kv_cache_bytes_measured": observed[t].cache_bytes,
                "memory_prefill": mem[t],
            }
        )
    first = next(iter(cases.values()))
    own_ids = first.prompts[0].position_ids
    stage = None
    if staged is not None:
        stage = stage_point(cfg, lm, pipes["compressed"].manifest, staged, stage_case, timed, observed, mem, points)
    return {
        "status": "ok",
        "llm_stage": stage,
        "clock": "wall" + (" + cuda synchronize" if lm.device.startswith("cuda") else ""),  # the decoder's own
        "model": lm.info(),
        "weights": "seeded random (shapes matter for timing, values do not)",
        "kv_cache_dtype_full_model": KV_DTYPE_FULL_MODEL,
        "position_ids": "1-D, 0..L-1 (the decoder's own)"
        if own_ids is None
        else f"the family's, [{own_ids.shape[0]}, L]",
        "points": points,
        "text_tokens": first.context - first.t,
        "text_tokens_source": "--text-tokens"
        if cfg.text_tokens is not None
        else "the prompt, tokenized by the engine's tokenizer",
        "prompt": cfg.prompt,
        "new_tokens": cfg.new_tokens,
        "batch": cfg.batch,
    }


def stage_point(cfg: BenchConfig, lm: LanguageModel, manifest, staged, case, timed, observed, mem, points) -> dict:
    """The LLM-stage engine's point: its rows through Stage2Decoder, against the vision-only points at
    the stage's mean rows over the layers and at the vision stage's T."""
    full_layer, layer = int(manifest.llm_stage["layer"]), staged.layer
    keep, t1 = int(manifest.llm_stage["keep"]), case.t
    span = staged.span_rows(t1)
    after = case.context - (span - keep if span is not None and span > keep else 0)
    full = lm.full_layers
    mean = (full_layer * t1 + (full - full_layer) * keep) / full  # visual rows averaged over the full model's layers
    by_t = {p["T"]: p for p in points}
    prefill, decode = timed["llm_stage"]["prefill"], timed["llm_stage"]["decode"]
    per_token = decode["median_s"] / cfg.new_tokens
    return {
        "T_vision": t1,
        "keep_llm": keep,
        "layer_full_model": full_layer,
        "layer_run": layer,
        "mean_rows_full_model": mean,
        "context": case.context,
        "context_after_stage": after,
        "prefill": prefill,
        "prefill_ratio_vs_T": {
            str(t): ratio(prefill, by_t[t]["prefill"]) for t in sorted(by_t) if t in (t1, round(mean))
        },
        "decode": decode,
        "decode_s_per_token": per_token,
        "kv_cache_bytes_full_model": kv_cache_bytes_staged(lm.config, case.context, after, full_layer, cfg.batch),
        "kv_cache_bytes_measured": observed["llm_stage"].cache_bytes,
        "memory_prefill": mem["llm_stage"],
    }
