"""The vision stage: each engine through its model family's adapter, per vision backend.

    batch = family.preprocess(items)       # the engine's named inputs (the checkpoint's own processor)
    rows = family.encode(backend, batch)   # one VisualRows per item: the rows the LLM gets

So multi-crop, dynamic-resolution, multi-call and multi-engine (a family's `parts`) families are
measured as they run. The bench medium - the image (--image), or a video (--video) for a family that
takes videos - and its rows, T from the compressed engine and N from the uncompressed one, are what
every section reports as T and N (`media_rows`): 64 and 576 for LLaVA-1.5 at keep 64; for families
whose rows depend on the medium, what this one gets.

Backends, in preference order: tensorrt (the engine's vision.plan), onnxruntime_cuda, torch_cuda
(the family's PyTorch eager module, `family.torch_module`, in fp16), onnxruntime_cpu. One this
machine cannot run is reported as "not available: <why>".
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import BenchConfig, log
from .engines import EnginePair
from .measure import Memory, measure_interleaved, ratio


class Unavailable(RuntimeError):
    """A backend this machine cannot run (the message is the reason)."""


# -- backends -----------------------------------------------------------------------------------


def _engines(manifest, make):
    """One backend over the engine directory's vision engines: make(manifest) for the main engine and
    for each of the family's other towers (manifest parts), behind one PartsBackend - as runtime.load
    puts them together."""
    from apet_trt.runtime.backends import PartsBackend

    engines = [make(m) for m in [manifest, *(manifest.part(p) for p in manifest.parts)]]
    return engines[0] if len(engines) == 1 else PartsBackend(manifest, engines)


def _vision_model(manifest, device, dtype):
    """The checkpoint model the family's torch module takes its vision parts from, on device in dtype:
    the saved checkpoint, or - for a preset recorded with seeded random weights - the preset's
    parts rebuilt from its seed (the same weights `apet build` exported)."""
    from apet_trt.runtime.checkpoint import load_transformers_model
    from apet_trt.runtime.families import family_class

    entry = (manifest.data.get("decoder") or {}).get("transformers") or {}
    if entry.get("weights", "saved") == "saved":
        model_class = family_class(manifest.family).hf_model_class
        return load_transformers_model(manifest, device=device, model_class=model_class, dtype=dtype)
    if manifest.data["model"].get("source") == "preset":
        try:
            from apet_trt.export.presets import load_preset
        except ImportError as exc:
            raise Unavailable(f"the preset's seeded vision weights need export/ ({exc})") from exc
        return load_preset(manifest.data["model"]["id"]).model.to(device=device, dtype=dtype).eval()
    raise Unavailable(f"{manifest.root}: no saved weights for the torch vision path")


def torch_vision_pair(pair: EnginePair, device: str, dtype) -> tuple:
    """(compressed, baseline) VisionBackends running each engine's family module in PyTorch eager
    (`family.torch_module(model)`: the checkpoint's own tower and projector, with ApetCompressor or
    without), sharing one copy of the weights."""
    import torch

    from apet_trt.runtime.backends import VisionBackend
    from apet_trt.runtime.families import family_for

    class TorchModuleBackend(VisionBackend):
        name = "torch"

        def __init__(self, manifest, module):
            super().__init__(manifest)
            self.module = module

        def _run(self, feeds):
            with torch.inference_mode():
                return self.module(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()})

    model = _vision_model(pair.compressed, torch.device(device), dtype)
    pairs = []
    for m in (pair.compressed, pair.baseline):
        module = family_for(m).torch_module(model).to(device).eval()  # one module takes every part's inputs
        pairs.append(_engines(m, lambda part, module=module: TorchModuleBackend(part, module)))
    return tuple(pairs)


def open_vision_pair(name: str, pair: EnginePair) -> tuple:
    """-> (compressed backend, baseline backend, device, clock); raises Unavailable with the reason."""
    import torch

    from apet_trt.apet_ops.probes import onnxruntime_cuda, tensorrt_available
    from apet_trt.runtime.backends import PartsBackend, create_backend

    engines = (pair.compressed, pair.baseline)

    def opened(kind: str, device: str) -> list:
        return [_engines(m, lambda part: create_backend(kind, part, device=device)) for m in engines]

    if name == "onnxruntime_cpu":
        return (*opened("onnxruntime", "cpu"), "cpu", "wall")
    if name == "onnxruntime_cuda":
        ok, why = onnxruntime_cuda()
        if not ok:
            raise Unavailable(why)
        backends = opened("onnxruntime", "cuda")
        main = backends[0].engines[0] if isinstance(backends[0], PartsBackend) else backends[0]
        got = main.session.get_providers()
        if got[0] != "CUDAExecutionProvider":
            raise Unavailable(f"ONNX Runtime could not start its CUDA provider (session providers: {got})")
        return (*backends, "cuda", "cuda_events" if torch.cuda.is_available() else "wall")
    if name == "tensorrt":
        ok, why = tensorrt_available()
        missing = [str(m.root) for m in engines if m.engine_path("tensorrt") is None]
        if missing:
            raise Unavailable(
                f"no TensorRT plan in {', '.join(missing)} (built where TensorRT was not importable)"
                + ("" if ok else f"; {why}")
            )
        if not ok:
            raise Unavailable(why)
        return (*opened("tensorrt", "cuda"), "cuda", "cuda_events")
    if name == "torch_cuda":
        if not torch.cuda.is_available():
            raise Unavailable("no CUDA GPU is visible to torch")
        return (*torch_vision_pair(pair, "cuda", torch.float16), "cuda", "cuda_events")
    raise ValueError(f"unknown vision backend {name!r}")


class VisionPairs:
    """Opens each backend pair once (the vision, decoder and request sections share them)."""

    def __init__(self, pair: EnginePair):
        self.pair = pair
        self._opened: dict[str, tuple] = {}
        self._reasons: dict[str, str] = {}

    def get(self, name: str):
        """-> (compressed, baseline, device, clock) or None (see reason(name))."""
        if name not in self._opened and name not in self._reasons:
            try:
                self._opened[name] = open_vision_pair(name, self.pair)
            except Unavailable as exc:
                self._reasons[name] = f"not available: {exc}"
            except Exception as exc:  # noqa: BLE001 - a backend that should work but fails is reported
                self._reasons[name] = f"failed to open: {type(exc).__name__}: {' '.join(str(exc).split())}"
                log(f"vision backend {name}: {self._reasons[name]}")
        return self._opened.get(name)

    def reason(self, name: str) -> str | None:
        return self._reasons.get(name)

    def first(self, order: list[str]) -> str:
        """The first backend of `order` that opens; RuntimeError naming every reason when none does."""
        for name in order:
            if self.get(name) is not None:
                return name
        raise RuntimeError("no vision backend could be opened: " + "; ".join(f"{n}: {self.reason(n)}" for n in order))


# -- the bench medium's rows --------------------------------------------------------------------


@dataclass
class MediaRows:
    """The bench medium (repeated `batch` times) through both engines' family adapters."""

    kind: str  # "image" | "video"
    backend: str  # the vision backend that made the rows (the request section's)
    comp_batch: object  # EngineBatch of the compressed engine's family
    base_batch: object
    comp_rows: list  # list[VisualRows], one per item
    base_rows: list

    @property
    def t(self) -> int:
        """The rows the medium hands the LLM with ApET."""
        return self.comp_rows[0].num_rows

    @property
    def n(self) -> int:
        """The rows it hands the LLM without: the uncompressed engine's."""
        return self.base_rows[0].num_rows


def backend_order(cfg: BenchConfig) -> list[str]:
    """The request section's vision backend first (when named), then every backend to try."""
    tried = cfg.vision_backends()
    return tried if cfg.request_backend == "auto" else [cfg.request_backend, *tried]


def media_items(cfg: BenchConfig, family) -> list:
    """The bench medium as the family's media items, `batch` times: a PIL image, or a video sampled
    to the family's frames (runtime/videos.py, as Pipeline.generate(videos=...) reads it)."""
    from apet_trt.runtime.images import to_pil
    from apet_trt.runtime.videos import read_video

    kind, path = cfg.media
    if kind == "image":
        return [to_pil(path)] * cfg.batch
    if family.frames_per_video is None:
        raise ValueError(f"--video: the {family.name} family takes no videos (give --image)")
    return [read_video(path, family.frames_per_video, sampling=family.frame_sampling)] * cfg.batch


def media_rows(cfg: BenchConfig, pair: EnginePair, pairs: VisionPairs) -> MediaRows:
    """Preprocess the bench medium with each engine's family and encode it once (untimed)."""
    from apet_trt.runtime.families import family_for

    name = pairs.first(backend_order(cfg))
    comp, base, _, _ = pairs.get(name)
    comp_family, base_family = family_for(pair.compressed), family_for(pair.baseline)
    comp_batch = comp_family.preprocess(media_items(cfg, comp_family))
    base_batch = base_family.preprocess(media_items(cfg, base_family))
    kind, path = cfg.media
    rows = MediaRows(
        kind, name, comp_batch, base_batch, comp_family.encode(comp, comp_batch), base_family.encode(base, base_batch)
    )
    uncompressed = rows.comp_rows[0].num_patches  # what the compressed engine says N is for this medium
    if uncompressed != rows.n:
        raise RuntimeError(
            f"the compressed engine reports {uncompressed} uncompressed rows for {path}, the uncompressed "
            f"engine gives {rows.n}: the two engines disagree about the {kind}"
        )
    log(f"rows: {path} gets N={rows.n} rows without ApET, T={rows.t} with ({name})")
    if rows.t == rows.n:
        log(
            f"the compressed engine does not compress this {kind} (T = N = {rows.n}); "
            + ("a family that compresses videos only is benchmarked with --video" if kind == "image" else "")
        )
    return rows


# -- the section --------------------------------------------------------------------------------


def bench_vision(cfg: BenchConfig, pair: EnginePair, pairs: VisionPairs, rows: MediaRows, memory: Memory) -> dict:
    """family.encode of both engines on the bench medium, per backend, interleaved; then one untimed
    call each for memory, which also keeps the compressed engine's kept positions."""
    import torch

    from apet_trt.runtime.families import family_for

    entries, positions = [], {}
    comp_family, base_family = family_for(pair.compressed), family_for(pair.baseline)
    for name in cfg.vision_backends():
        entry = {
            "name": name,
            "available": False,
            "reason": None,
            "device": None,
            "clock": None,
            "timings": None,
            "ratio_apet_over_no_apet": None,
            "memory": None,
            "positions_equal_onnxruntime_cpu": None,
        }
        entries.append(entry)
        opened = pairs.get(name)
        if opened is None:
            entry["reason"] = pairs.reason(name)
            log(f"vision {name}: {entry['reason']}")
            continue
        comp, base, device, clock = opened
        entry.update(available=True, device=device, clock=clock)
        log(f"vision {name}: T={rows.t} vs N={rows.n} rows, batch {cfg.batch}")
        with_apet = lambda: comp_family.encode(comp, rows.comp_batch)
        without_apet = lambda: base_family.encode(base, rows.base_batch)
        try:
            timings = measure_interleaved(
                {"with_apet": with_apet, "without_apet": without_apet},
                repeats=cfg.repeats,
                warmup=cfg.warmup,
                cuda_events=clock == "cuda_events",
                desc=f"vision {name}",
            )
            on_cuda = device == "cuda" and torch.cuda.is_available()
            entry["memory"] = {
                "with_apet": memory.measure(
                    lambda: positions.__setitem__(name, torch.cat([r.positions for r in with_apet()])), cuda=on_cuda
                ),
                "without_apet": memory.measure(without_apet, cuda=on_cuda),
            }
        except Exception as exc:  # noqa: BLE001 - keep the other backends' results
            entry.update(available=False, reason=f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
            log(f"vision {name}: {entry['reason']}")
            continue
        entry["timings"] = timings
        entry["ratio_apet_over_no_apet"] = ratio(timings["with_apet"], timings["without_apet"])
    # kept positions of every backend against ONNX Runtime CPU's (fp16 backends may differ: recorded, not asserted)
    if "onnxruntime_cpu" in positions:
        for entry in entries:
            if entry["available"] and entry["name"] in positions:
                entry["positions_equal_onnxruntime_cpu"] = bool(
                    torch.equal(positions[entry["name"]], positions["onnxruntime_cpu"])
                )
    return {"status": "ok", "batch": cfg.batch, "media": cfg.media[1], "T": rows.t, "N": rows.n, "backends": entries}
