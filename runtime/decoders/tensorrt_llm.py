"""TensorRT-LLM decoders (imported lazily: `pip install apet-trt[tensorrt-llm]`, NVIDIA GPU).

TensorRTLLMDecoder: `tensorrt_llm.runtime.ModelRunnerCpp` on an engine built by `trtllm-build`
(with `--max_multimodal_len` >= max_batch * rows per request). The visual rows go in through the
prompt table exactly as docs/DESIGN.md says; the construction is `prompt_table.build_prompt_table_inputs`.
API read from TensorRT-LLM's source, tensorrt_llm/runtime/model_runner_cpp.py:
  ModelRunnerCpp.from_dir(engine_dir, rank=..., max_batch_size=..., max_input_len=..., ...)
  runner.generate(batch_input_ids: list[Tensor], prompt_table=Tensor, prompt_tasks="0,1,...",
                  max_new_tokens=, end_id=, pad_id=, temperature=, top_k=, top_p=, random_seed=,
                  streaming=, return_dict=, output_sequence_lengths=)
  -> {"output_ids": [B, beams, max_seq_len] (the input ids followed by the generated ones),
      "sequence_lengths": [B, beams]}; with streaming=True a generator of such dicts.
  runner.vocab_size, runner.max_prompt_embedding_table_size, runner.dtype, runner.max_input_len.
(examples/multimodal/README.md: "--max_multimodal_len ... [batch_size, num_visual_features,
visual_hidden_dim] is flattened ... and passed like a prompt embedding table".)

TensorRTLLMAPIDecoder: the LLM API (PyTorch backend, TensorRT-LLM >= 1.0) for the families whose
rows its input processor takes exactly as precomputed embeddings (LLaVA-NeXT; not LLaVA-1.5, which
that backend does not have): `LLM(model=hf_dir).generate_async({"prompt": text,
"multi_modal_embeddings": {"image": [tensor(R_i, H) per image]}}, sampling_params=..., streaming=True)`.
The prompt is the conversation text with one placeholder per image (the LLM API's input processor
expands each to the rows given); the request is documented on the class. Not Qwen2.5-VL: for M-RoPE
models TensorRT-LLM places the rows on a compact grid it infers, so the kept rows' own position ids
cannot reach it; a prompt that carries them is refused (docs/UPSTREAM.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..prompt import AssembledPrompt
from . import DecodeOutput, Decoder, SamplingConfig, Visual, llm_api_inputs
from .prompt_table import build_prompt_table_inputs

_INSTALL = "pip install apet-trt[tensorrt-llm] (TensorRT-LLM, on a machine with an NVIDIA GPU)"


def _import_tensorrt_llm(require_cuda: bool = True):
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the TensorRT-LLM decoder needs the tensorrt_llm package: {_INSTALL}") from exc
    if require_cuda and not torch.cuda.is_available():
        raise RuntimeError("the TensorRT-LLM decoder needs a CUDA GPU, and torch sees none")
    return tensorrt_llm


def _sampling_kwargs(s: SamplingConfig) -> dict:
    """SamplingConfig -> ModelRunnerCpp.generate keyword arguments (they override its
    trtllm.SamplingConfig fields). The seed goes in as `random_seed`: generate keeps only the
    sampling keywords it lists (num_beams, top_k, top_p, temperature, ..., "random_seed", ...) and
    renames random_seed to the executor SamplingConfig's `seed`; a `seed` keyword would be dropped
    without a word (tensorrt_llm/runtime/model_runner_cpp.py, ModelRunnerCpp.generate, TensorRT-LLM
    1.0; tests/export/test_tensorrt_api.py checks it wherever tensorrt_llm imports)."""
    if not s.do_sample:
        return {"top_k": 1, "temperature": 1.0}
    kw = {"temperature": s.temperature, "top_k": s.top_k or 0, "top_p": s.top_p}
    if s.seed is not None:
        kw["random_seed"] = int(s.seed)
    return kw


class TensorRTLLMDecoder(Decoder):
    name = "tensorrt_llm"

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        vocab_size: int,
        max_rows: int | None,
        eos_token_id: int,
        pad_token_id: int,
        dtype: torch.dtype,
    ):
        _import_tensorrt_llm()
        from tensorrt_llm.runtime import ModelRunnerCpp

        engine_dir = Path(engine_dir)
        if not (engine_dir / "config.json").is_file():
            raise FileNotFoundError(f"{engine_dir}: not a TensorRT-LLM engine directory (no config.json)")
        self.runner = ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=0)
        self.vocab_size = int(vocab_size)
        if int(self.runner.vocab_size) != self.vocab_size:
            raise ValueError(
                f"{engine_dir}: the TensorRT-LLM engine's vocab_size {self.runner.vocab_size} differs "
                f"from the manifest's {self.vocab_size}"
            )
        self.dtype = self.runner.dtype if dtype is None else dtype
        if self.runner.dtype != self.dtype:
            raise ValueError(
                f"{engine_dir}: the TensorRT-LLM engine runs in {self.runner.dtype}, the manifest says "
                f"{self.dtype}; the prompt table must be in the engine's dtype"
            )
        # ModelRunnerCpp gives each request its own table and rejects one longer than
        # max_prompt_embedding_table_size / max_batch_size (docs/DESIGN.md).
        self.engine_dir = engine_dir
        self.rows_per_request = int(self.runner.max_prompt_embedding_table_size) // max(
            1, int(self.runner.max_batch_size)
        )
        if max_rows is not None:  # a family with one row count per image: check it now, not per request
            self._check_rows(int(max_rows), "T=")
        self.max_length = int(self.runner.max_sequence_length)
        self.max_batch_size = int(self.runner.max_batch_size)
        self.max_input_len = int(self.runner.max_input_len)
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)

    def _check_rows(self, rows: int, what: str) -> None:
        if rows > self.rows_per_request:
            raise ValueError(
                f"{self.engine_dir}: built with max_multimodal_len {self.runner.max_prompt_embedding_table_size} for "
                f"max_batch_size {self.runner.max_batch_size}: {self.rows_per_request} visual rows per request < "
                f"{what}{rows}; rebuild with --max_multimodal_len >= {rows * int(self.runner.max_batch_size)}"
            )

    def check_lengths(self, prompts, max_new_tokens):
        super().check_lengths(prompts, max_new_tokens)
        for b, p in enumerate(prompts):
            if p.input_ids.numel() > self.max_input_len:
                raise ValueError(
                    f"prompt {b}: {p.input_ids.numel()} tokens exceed the TensorRT-LLM engine's "
                    f"max_input_len {self.max_input_len}"
                )

    def generate(self, prompts: Sequence[AssembledPrompt], visual: Visual, sampling: SamplingConfig) -> DecodeOutput:
        self.check_batch(prompts, visual)
        self.check_lengths(prompts, sampling.max_new_tokens)
        for b, p in enumerate(prompts):
            self._check_rows(int(p.image_slots.numel()), f"prompt {b}'s ")
        ids: list[list[int]] = []
        first_ms = decode_ms = 0.0
        for start in range(0, len(prompts), self.max_batch_size):  # the engine's batch limit
            chunk = slice(start, start + self.max_batch_size)
            out = self._generate_chunk(prompts[chunk], visual[chunk], sampling)
            ids += out.ids
            first_ms += out.first_token_ms
            decode_ms += out.decode_ms
        return DecodeOutput(ids=ids, first_token_ms=first_ms, decode_ms=decode_ms)

    def _generate_chunk(self, prompts, visual, sampling) -> DecodeOutput:
        inputs = build_prompt_table_inputs(
            [p.input_ids for p in prompts],
            [p.image_slots for p in prompts],
            [torch.cat(list(images)) for images in visual],
            vocab_size=self.vocab_size,
            dtype=self.dtype,
        )
        t0 = time.perf_counter()
        first = None
        final = None
        # streaming=True yields after every step: the first yield marks the first token.
        for final in self.runner.generate(  # noqa: B007 - the last yield is the result
            inputs.batch_input_ids,
            prompt_table=inputs.prompt_table.cuda(),
            prompt_tasks=inputs.prompt_tasks,
            max_new_tokens=sampling.max_new_tokens,
            end_id=self.eos_token_id,
            pad_id=self.pad_token_id,
            streaming=True,
            return_dict=True,
            output_sequence_lengths=True,
            **_sampling_kwargs(sampling),
        ):
            if first is None:
                torch.cuda.synchronize()
                first = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if final is None:
            raise RuntimeError("TensorRT-LLM returned no output (is this process MPI rank 0?)")
        output_ids = final["output_ids"].cpu()
        lengths = final["sequence_lengths"].cpu()
        ids = []
        for b, p in enumerate(prompts):
            n_in = int(p.input_ids.numel())
            ids.append(output_ids[b, 0, n_in : int(lengths[b, 0])].tolist())
        first = first or t2
        return DecodeOutput(ids=ids, first_token_ms=(first - t0) * 1e3, decode_ms=(t2 - first) * 1e3)


class TensorRTLLMAPIDecoder(Decoder):
    """TensorRT-LLM's LLM API (PyTorch backend; the route that survives the engine flow's removal after
    1.3.0rc20) fed each image's rows as precomputed embeddings, for the families whose TensorRT-LLM
    input processor implements `attach_multimodal_embeddings` (LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL; not
    LLaVA-1.5).

    The request, as TensorRT-LLM 1.2's source reads it: `LLM.generate_async` hands a prompt dict that
    holds "multi_modal_embeddings" to `input_processor.attach_multimodal_embeddings(inputs,
    inputs["multi_modal_embeddings"], sampling_params)` (tensorrt_llm/llmapi/llm.py). For LLaVA-NeXT
    (tensorrt_llm/_torch/models/modeling_llava_next.py, LlavaNextInputProcessor) that tokenizes
    "prompt" with the checkpoint's tokenizer (special tokens added: the BOS), finds the image token
    ids (config.image_token_index), and replaces the i-th by R_i out-of-vocabulary ids
    vocab_size + 0, 1, ... (`_postprocess`: one split per list entry, a 2-D entry is one image of R_i
    rows); the model's `fuse_input_embeds` then puts the rows, concatenated in order, at those ids,
    cast to the model's dtype and device. So each request is

        {"prompt": the conversation text, one image token per image, no BOS,
         "multi_modal_embeddings": {"image": [rows of image 0 [R_0, H], rows of image 1, ...]}}

    which gives the language model exactly the sequence `TransformersDecoder` builds (the prompt
    assembler tokenizes the same text with each image token repeated R_i times). Prompts that carry
    their own position ids (Qwen2.5-VL's M-RoPE ids of the kept rows) are refused: this route has no
    way to hand them over.
    """

    name = "tensorrt_llm_api"

    def __init__(
        self,
        hf_checkpoint: str | Path,
        *,
        image_token: str,
        max_length: int,
        dtype: torch.dtype = torch.float16,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        device: str = "cuda",
        **llm_kwargs,
    ):
        """`hf_checkpoint`: the whole Transformers checkpoint (config, weights, tokenizer, processor),
        what `LLM(model=...)` loads; `dtype`: the rows' dtype on the way in (the LLM's); `llm_kwargs`
        go to `tensorrt_llm.LLM` (e.g. kv_cache_config, max_num_tokens)."""
        self.device = torch.device(device)
        _import_tensorrt_llm(require_cuda=self.device.type == "cuda")
        from tensorrt_llm import LLM

        hf_checkpoint = Path(hf_checkpoint)
        if not (hf_checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{hf_checkpoint}: not a Transformers checkpoint directory (no config.json)")
        self.llm = LLM(model=str(hf_checkpoint), **llm_kwargs)
        self.image_token = image_token
        self.max_length = int(max_length)
        self.dtype = dtype
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def sampling_params(self, sampling: SamplingConfig):
        """SamplingConfig -> tensorrt_llm.SamplingParams (greedy: top_k 1, temperature 0)."""
        from tensorrt_llm import SamplingParams

        kwargs = {}
        if self.eos_token_id is not None:
            kwargs["end_id"] = int(self.eos_token_id)
        if self.pad_token_id is not None:
            kwargs["pad_id"] = int(self.pad_token_id)
        return SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_k=(sampling.top_k or None) if sampling.do_sample else 1,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            seed=sampling.seed,
            **kwargs,
        )

    def requests(self, prompts: Sequence[AssembledPrompt], visual: Visual) -> list[dict]:
        """The LLM API prompt dicts (see the class docstring)."""
        self.check_batch(prompts, visual)
        out = []
        for b, (p, images) in enumerate(zip(prompts, visual)):
            if p.text.count(self.image_token) != len(images):
                raise ValueError(
                    f"prompt {b}: {p.text.count(self.image_token)} {self.image_token!r} in its text for "
                    f"{len(images)} image(s): TensorRT-LLM expands one per image"
                )
            if p.position_ids is not None:  # the family's own ids (Qwen2.5-VL's M-RoPE): no way to hand them over
                raise ValueError(
                    f"prompt {b}: its rows carry their own position ids, which TensorRT-LLM's LLM API cannot take "
                    "(it infers a grid); use decoder='transformers'"
                )
            rows = [x.detach().to(device=self.device, dtype=self.dtype) for x in images]
            out.append(llm_api_inputs.request(p, rows, self.device))
        return out

    def generate(self, prompts: Sequence[AssembledPrompt], visual: Visual, sampling: SamplingConfig) -> DecodeOutput:
        self.check_lengths(prompts, sampling.max_new_tokens)
        requests = self.requests(prompts, visual)
        params = self.sampling_params(sampling)
        t0 = time.perf_counter()
        # streamed, so the first step of every request (its prefill and first token) is observable
        try:
            pending = [self.llm.generate_async(r, sampling_params=params, streaming=True) for r in requests]
            for result in pending:
                next(result, None)
        except NotImplementedError as exc:  # the model's input processor takes no precomputed embeddings
            raise RuntimeError(
                f"this TensorRT-LLM's LLM API takes no precomputed embeddings for this model ({exc}); "
                "upgrade tensorrt_llm or use decoder='transformers'"
            ) from exc
        t1 = time.perf_counter()
        ids = [list(result.result().outputs[0].token_ids) for result in pending]
        t2 = time.perf_counter()
        return DecodeOutput(ids=ids, first_token_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3)
