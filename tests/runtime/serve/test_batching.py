"""The batcher (runtime/serve/batching.py) without HTTP, deterministically: requests queued before
the workers start meet in one vision call and one decoder call, and each answer equals
`Pipeline.generate` alone; the queue bound; the decoder's on_step streaming and row stopping."""

import asyncio

import pytest
import torch

from apet_trt import runtime
from apet_trt.runtime.decoders import SamplingConfig
from apet_trt.runtime.serve.batching import Batcher, Detokenizer, Job
from apet_trt.runtime.serve.errors import APIError
from apet_trt.runtime.serve.metrics import Metrics
from helpers.engines import IMAGE_SIZE, build_engine_dir

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return runtime.load(build_engine_dir(tmp_path_factory.mktemp("batch") / "t12", keep=12), backend="onnxruntime")


def _image(rng, wide=False):
    shape = (IMAGE_SIZE, 2 * IMAGE_SIZE, 3) if wide else (IMAGE_SIZE + 7, IMAGE_SIZE, 3)
    return torch.randint(0, 256, shape, generator=rng, dtype=torch.uint8).numpy()


def _batcher(pipe, **kw) -> Batcher:
    args = dict(max_batch=4, batch_wait_ms=0, max_queue=8, default_max_tokens=6, metrics=Metrics("m"))
    return Batcher(pipe, **{**args, **kw})


async def _result(job: Job) -> dict:
    while True:
        kind, value = await asyncio.wait_for(job.events.get(), 120)
        if kind == "done":
            return value
        if kind == "error":
            raise value


def _sum(histogram) -> tuple[float, float]:
    [metric] = histogram.collect()
    values = {s.name.rsplit("_", 1)[-1]: s.value for s in metric.samples if not s.name.endswith("_bucket")}
    return values["count"], values["sum"]


def test_queued_requests_share_one_vision_and_one_decoder_call(pipe, rng):
    images = [_image(rng, wide=i % 2 == 1) for i in range(3)]

    async def main():
        loop = asyncio.get_running_loop()
        b = _batcher(pipe)
        jobs = [
            Job(
                id=str(i),
                images=[img],
                rows=[None],
                loop=loop,
                conversation=PROMPT,
                max_tokens=6,
                sampling=dict(do_sample=False),
            )
            for i, img in enumerate(images)
        ]
        for job in jobs:
            b.submit(job)  # before the workers start: they find all three waiting
        b.start()
        try:
            return b, await asyncio.gather(*(_result(j) for j in jobs))
        finally:
            await asyncio.to_thread(b.close)

    b, results = asyncio.run(main())
    assert _sum(b.metrics.vision_batch) == (1, 3)  # one vision call with 3 images
    assert _sum(b.metrics.decoder_batch) == (1, 3)  # one decoder call with 3 prompts
    for image, result in zip(images, results):
        [ref] = pipe.generate(image, "What is it?", max_new_tokens=6)
        assert result["ids"] == ref.ids and result["text"] == ref.text


def test_different_sampling_settings_decode_apart_seeded_alone(pipe, rng):
    image = _image(rng)

    async def main():
        loop = asyncio.get_running_loop()
        b = _batcher(pipe)
        specs = [(4, {}), (6, {}), (4, {}), (5, dict(do_sample=True, seed=3)), (5, dict(do_sample=True, seed=3))]
        jobs = [
            Job(
                id=str(i),
                images=[image],
                rows=[None],
                loop=loop,
                conversation=PROMPT,
                max_tokens=n,
                sampling=dict(do_sample=False) | s,
            )
            for i, (n, s) in enumerate(specs)
        ]
        for job in jobs:
            b.submit(job)
        b.start()
        try:
            return b, await asyncio.gather(*(_result(j) for j in jobs))
        finally:
            await asyncio.to_thread(b.close)

    b, results = asyncio.run(main())
    # greedy n=4 twice in one call, greedy n=6, and each seeded request alone: 4 decoder calls
    assert _sum(b.metrics.decoder_batch) == (4, 5)
    assert [len(r["ids"]) for r in results[:3]] == [4, 6, 4]
    [ref] = pipe.generate(image, "What is it?", max_new_tokens=5, do_sample=True, seed=3)
    assert results[3]["ids"] == results[4]["ids"] == ref.ids


def test_admission_is_bounded(pipe, rng):
    async def main():
        loop = asyncio.get_running_loop()
        b = _batcher(pipe, max_queue=2)
        jobs = [Job(id=str(i), images=[_image(rng)], rows=[None], loop=loop, conversation=PROMPT) for i in range(2)]
        for job in jobs:
            job.slot = b.admit()  # a slot per request, taken before its body is read
            b.submit(job)  # the workers hold a share of it
            job.slot.release()  # and the handler lets go of its own: the slot stays taken
        with pytest.raises(APIError) as err:
            b.admit()
        assert err.value.status == 503 and b.inside == 2
        await asyncio.to_thread(b.close)  # queued requests are answered 503, not dropped
        for job in jobs:
            kind, value = job.events.get_nowait()
            assert kind == "error" and value.status == 503
        assert b.inside == 0  # their slots came back
        with pytest.raises(APIError, match="shutting down"):
            b.admit()

    asyncio.run(main())


def test_decoder_streams_steps_and_stops_rows(pipe, rng):
    """generate_streaming: on_step sees every id as it is picked; a row stopped by on_step ends there
    while the other rows' ids equal a call without it."""
    images = [_image(rng), _image(rng, wide=True)]
    rows = pipe.encode(images)
    prompts = [pipe.assemble(PROMPT, [r]) for r in rows]
    visual = [[r.embeddings] for r in rows]
    sampling = SamplingConfig(max_new_tokens=8)
    full = pipe.decoder.generate(prompts, visual, sampling)
    seen = [[], []]

    def on_step(tokens):
        for i, t in enumerate(tokens):
            if t is not None:
                seen[i].append(t)
        return [0] if len(seen[0]) == 3 else None

    out = pipe.decoder.generate_streaming(prompts, visual, sampling, on_step)
    assert out.ids[1] == full.ids[1] == seen[1]
    assert out.ids[0] == full.ids[0][:3] == seen[0]


def test_detokenizer_deltas_concatenate_to_the_text(pipe, rng):
    ids = torch.randint(0, len(pipe.tokenizer), (40,), generator=rng).tolist()

    def decode(x):
        return pipe.tokenizer.decode(x, skip_special_tokens=True)

    d = Detokenizer(decode)
    text = "".join(d.push(t) for t in ids)
    text += d.finish(decode(ids))
    assert text == decode(ids)
