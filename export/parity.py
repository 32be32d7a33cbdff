"""Paper parity options of `apet build`: the official budgets, ApET's second stage inside the LLM, a
random first FPS seed, LLaVA-1.5's pad-to-square preprocessing (docs/DESIGN.md, "Paper parity").

What the official code runs (MaQianKun0/ApET @ 70cc01b, scripts/llava1_5/*.sh and
llava/model/modeling_llama_x.py): `--visual_token_num 96 --layer_list '[16]' --image_token_list
'[32]'` keeps 96 rows per image in the vision stage and, after decoder layer 16 (`rank_layer =
layer_idx + 1`), ApET again on the image's hidden states keeps 32; over the 32 layers that averages
64 rows, the paper's "64". Here that is `--budget 64` = `--keep 96 --llm-stage 16:32`.

Recorded in the manifest (docs/ENGINE_DIR.md):
    llm_stage     null | {"layer": 16, "keep": 32, "basis": 10, "merge": true, "ridge": 1e-05,
                  "start": 0, "seed_placement": "error_rank"}: the Transformers decoder runs it;
                  the decoders that cannot (TensorRT-LLM, the LLM API, an upstream) refuse the engine
    random_start  null | {"seed": S}: every FPS start (vision engine input "start", stage 2) is
                  drawn by the runtime from generators seeded with S (vision S, LLM stage S + 1)
    image_aspect  "default" (the checkpoint processor's own) | "pad" (expand2square with the
                  processor's mean colour, then the processor)
"""

from __future__ import annotations

from dataclasses import dataclass

from apet_trt.apet_ops import ApetConfig

# --budget B -> (vision keep, layer, LLM-stage keep): the official scripts' pairs
OFFICIAL_BUDGETS: dict[int, tuple[int, int, int]] = {64: (96, 16, 32), 128: (192, 16, 64), 192: (288, 16, 96)}
IMAGE_ASPECTS = ("default", "pad")
RANDOM = "random"


@dataclass(frozen=True)
class LlmStage:
    """ApET on the image rows of the hidden states after `layer` decoder layers, keeping `keep`."""

    layer: int
    keep: int

    @classmethod
    def parse(cls, text) -> LlmStage:
        """ "LAYER:KEEP" (e.g. "16:32") or a (layer, keep) pair."""
        try:
            layer, keep = (int(x) for x in (text.split(":") if isinstance(text, str) else text))
        except (TypeError, ValueError):
            raise ValueError(f"--llm-stage must be LAYER:KEEP (e.g. 16:32), got {text!r}") from None
        if layer < 1 or keep < 1:
            raise ValueError(f"--llm-stage {text}: LAYER and KEEP must be >= 1")
        return cls(layer, keep)

    def config(self, basis: int, merge: bool, ridge: float) -> ApetConfig:
        """The compressor stage 2 runs: the official layer_prune's choices (seeds by error rank)."""
        return ApetConfig(keep=self.keep, basis=basis, merge=merge, ridge=ridge, seed_placement="error_rank")

    def manifest(self, basis: int, merge: bool, ridge: float) -> dict:
        return {"layer": self.layer, **self.config(basis, merge, ridge).to_dict()}


@dataclass(frozen=True)
class Plan:
    """What the parity options of one build resolve to."""

    keep: int | None  # the vision stage's T (None: no compression there)
    llm_stage: LlmStage | None
    start: int  # the fixed start (0 when random: the engine then takes a start input)
    random_seed: int | None  # not None: --start random with this seed
    image_aspect: str


def resolve(config) -> Plan:
    """A BuildConfig's keep / budget / llm_stage / start / image_aspect -> Plan (checks that need no
    model)."""
    keep, stage = config.keep, None
    if config.budget is not None:
        if config.budget not in OFFICIAL_BUDGETS:
            raise ValueError(f"--budget must be one of {sorted(OFFICIAL_BUDGETS)}, got {config.budget!r}")
        if config.keep is not None or config.keep_ratio is not None or config.llm_stage is not None or config.no_apet:
            raise ValueError(
                "--budget sets --keep and --llm-stage itself: pass it without --keep, --keep-ratio, --llm-stage, "
                "--no-apet"
            )
        keep, layer, keep2 = OFFICIAL_BUDGETS[config.budget]
        stage = LlmStage(layer, keep2)
    elif config.llm_stage is not None:
        stage = LlmStage.parse(config.llm_stage)
    if config.no_apet:
        keep = None
    start, seed = config.start, None
    if start == RANDOM:
        if isinstance(config.start_seed, bool) or not isinstance(config.start_seed, int):
            raise ValueError(f"--start-seed must be an integer, got {config.start_seed!r}")
        if keep is None and config.keep_ratio is None and stage is None:
            raise ValueError("--start random: nothing to draw starts for (--no-apet and no --llm-stage)")
        start, seed = 0, config.start_seed
    elif isinstance(start, str):
        raise ValueError(f"--start must be an index or 'random', got {start!r}")
    if config.image_aspect not in IMAGE_ASPECTS:
        raise ValueError(f"--image-aspect must be one of {IMAGE_ASPECTS}, got {config.image_aspect!r}")
    return Plan(keep, stage, start, seed, config.image_aspect)


def check_family(plan: Plan, family, apet: ApetConfig | None, config) -> None:
    """Refuse, before any weights are built, what this family or model cannot do."""
    if plan.image_aspect not in family.image_aspects:
        raise ValueError(
            f"--image-aspect {plan.image_aspect}: the {family.name} family takes {', '.join(family.image_aspects)}"
        )
    if plan.random_seed is not None and apet is not None and not family.supports_start_input:
        raise ValueError(f"--start random: the {family.name} family's vision engine takes no per-image start")
    stage = plan.llm_stage
    if stage is None:
        return
    if not family.llm_stage:
        raise ValueError(f"--llm-stage / --budget: the {family.name} family has no ApET stage inside the LLM")
    layers = int(family.config.text_config.num_hidden_layers)
    if not 1 <= stage.layer < layers:
        raise ValueError(
            f"--llm-stage {stage.layer}:{stage.keep}: the language model has {layers} decoder layers; LAYER must be "
            f"1..{layers - 1} (ApET runs after LAYER layers and at least one layer must follow)"
        )
    rows = family.rows_per_item(apet)  # the rows of an image's first engine item: what stage 2 prunes
    if stage.keep >= rows:
        raise ValueError(
            f"--llm-stage {stage.layer}:{stage.keep}: KEEP must be below the {rows} rows the vision stage hands "
            "the LLM per image"
        )
    stage.config(config.basis, config.merge, config.ridge).validate_for(rows)  # KEEP > basis


def manifest_fields(plan: Plan, config) -> dict:
    stage = plan.llm_stage
    return {
        "llm_stage": None if stage is None else stage.manifest(config.basis, config.merge, config.ridge),
        "random_start": None if plan.random_seed is None else {"seed": plan.random_seed},
        "image_aspect": plan.image_aspect,
    }
