"""An lmms-eval model over an apet-trt engine directory, so lmms-eval's tasks run against it.

lmms-eval (checked against 0.7.3, `lmms_eval/models/registry_v2.py`, `api/model.py`) loads a model
class from outside its tree in two ways, both used here:

- an object: `lmms_eval.evaluator.simple_evaluate(model=ApetEngine(engine="engines/t64"), tasks=[...])`;
- by name: the `lmms_eval.models` entry point this package declares (pyproject.toml) registers
  `apet` -> `manifest()` below, so `python -m lmms_eval --model apet --model_args engine=DIR,backend=auto
  --tasks TASK` works once apet-trt is installed.

This module imports lmms_eval at the top: only lmms-eval (or code that has it) imports it.
`generate_until` is the one request type a generating engine answers; requests are taken in order,
consecutive ones of one medium and one set of generation settings batched into one
`Pipeline.generate` call (greedy unless the task asks to sample), several images of one request go
through the pipeline's own steps (scripts/eval/answer.py). The task's context is the user prompt: the
engine's conversation template wraps it and places the images (a literal image token in the context
is dropped, as the template puts one per image). `until` stop strings cut the text after generation.
Log-likelihood requests are refused with a line saying so (the runtime's decoders generate; they do
not score given continuations).
"""

from __future__ import annotations

from lmms_eval.api.model import lmms
from tqdm import tqdm

from .answer import answer_batch, answer_images

MODEL_ID = "apet"


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest for `--model apet`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.ApetEngine")


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


class ApetEngine(lmms):
    """`--model apet --model_args engine=DIR[,backend=auto][,decoder=auto][,device=cpu][,batch_size=4]
    [,max_new_tokens=16]`: max_new_tokens is used where the task sets none."""

    is_simple = True

    def __init__(
        self,
        engine: str,
        backend: str = "auto",
        decoder: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = 16,
        **kwargs,
    ):
        super().__init__()
        from apet_trt.runtime import load

        unknown = set(kwargs) - {"max_batch_size"}  # lmms-eval passes its own batch settings
        if unknown:
            raise ValueError(
                f"apet model: unknown model_args {sorted(unknown)} (engine, backend, decoder, device, ...)"
            )
        self.pipe = load(engine, backend, None if device in (None, "", "None") else device, decoder=decoder)
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.visual_rows: list[int] = []  # rows handed to the LLM, per request answered

    def _prompt(self, context: str) -> str:
        return context.replace(self.pipe.manifest.image_token, "").strip()

    def _settings(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        unsupported = {k for k, v in gen_kwargs.items() if k in ("do_sample",) and _truthy(v)}
        if float(gen_kwargs.get("temperature", 0) or 0) > 0 or unsupported:
            raise ValueError("apet model: sampling was asked for; this adapter answers greedily (temperature 0)")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), until

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: list[list[tuple[int, str, list, str, int, list[str]]]] = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            visuals = [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]
            if not visuals:
                raise ValueError(
                    f"apet model: {task} doc {doc_id} has no image or video; an engine answers about media"
                )
            kind = "video" if isinstance(visuals[0], str) else "image"
            if kind == "image" and len(visuals) > 1:
                kind = "images"
            new_tokens, until = self._settings(dict(gen_kwargs))
            entry = (i, self._prompt(context), visuals, kind, new_tokens, until)
            last = groups[-1][-1] if groups else None
            if (
                last
                and kind != "images"
                and (last[3], last[4]) == (kind, new_tokens)
                and len(groups[-1]) < self.batch_size
            ):
                groups[-1].append(entry)
            else:
                groups.append([entry])
        for group in tqdm(groups, desc="apet", unit="batch", disable=self.rank != 0):
            _, _, _, kind, new_tokens, _ = group[0]
            if kind == "images":
                [(_, prompt, visuals, _, _, _)] = group
                records = [answer_images(self.pipe, visuals, prompt, new_tokens)]
            else:
                media = [v[0] for _, _, v, _, _, _ in group]
                records = answer_batch(self.pipe, kind, media, [p for _, p, _, _, _, _ in group], new_tokens)
            for (i, _, _, _, _, until), rec in zip(group, records):
                text = rec["answer"]
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out[i] = text
                self.visual_rows.append(rec["num_kept"])
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "apet model: log-likelihood requests are not supported (the engine's decoders generate; they do "
            "not score given continuations); use tasks whose output_type is generate_until"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("apet model: multi-round generation is not supported; one user turn per request")
