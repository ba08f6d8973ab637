"""The one table of which techniques combine: every composition refusal (and "works, degraded" note) lives here.

    s = settings_from(recipe_values, ds_dict, acc_values, world_size, on_cpu)   # normalised axes, see Settings
    errs = refusals(s, {"recipe": "r.yaml", "deepspeed": "ds.json"})           # -> [ConfigError], one per rule
    raise_first(s, where, component="rebuild")                                  # what a component checks at run time

`dsrecipes check` and the recipes' start-up check (check.cross_check / check_run), freezing.rebuild
(check_rebuild_supported), memory.activation_checkpointing (cpu_checkpointing) and the pipeline recipe
(pipeline_refusals) all ask this table, and docs/compat.md is generated from it (config/compat_doc.py).
A rule names the settings it concerns ({axis: values}); it fires when every one of them matches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsrecipes.config.errors import ConfigError
from dsrecipes.config.fields_parallel import autotp_size, sp_size  # the one reader of the sp and tp sizes
from dsrecipes.config.lint import get as _get

LOW_BIT_TORCHAO = ("torchao_adamw_8bit", "torchao_adamw_4bit")
NON_ADAMW = ("adamw_8bit", "paged_adamw_8bit") + LOW_BIT_TORCHAO
OFFLOADABLE_DS_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")
DEFAULT_PIPELINE_DS = "configs/deepspeed/zero1.json"


@dataclass(frozen=True)
class Settings:
    """One run's techniques on normalised axes (None: not known / not used)."""

    zero: int | None = None  # ZeRO stage 0-3 under DeepSpeed; None = no DeepSpeed (one process or DDP)
    offload: str = "none"  # optimizer offload device: none | cpu | nvme
    offload_param: str = "none"  # parameter offload device: none | cpu | nvme
    checkpointing: str = "none"  # none | hf_full_reentrant | hf_full | every_k | every_k_reentrant | deepspeed
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit | torchao_adamw_8bit | torchao_adamw_4bit
    precision: str = "no"  # no | bf16 | fp16
    freeze: str = "none"  # none | static | progressive
    cache: str = "none"  # frozen-prefix cache: none | memory | disk
    recipe: str = "train_lm"  # train_lm | distill | pipeline
    device: str | None = None  # cpu | gpu
    ds_optimizer: str = ""  # the DeepSpeed JSON's optimizer.type, lower case ("" = none: the recipe builds it)
    cpu_checkpointing: bool = False  # activation_checkpointing.cpu_checkpointing in the DeepSpeed JSON
    ds_pipeline: bool = False  # the DeepSpeed JSON has a `pipeline` section
    load_universal: bool = False  # checkpoint.load_universal is true in the DeepSpeed JSON
    lora: str = "none"  # none | lora (lora_r > 0) | qlora (lora_r > 0 with lora_quantize: nf4)
    sp: int = 1  # Ulysses sequence-parallel size (recipe key sequence_parallel_size)
    tiling: str = "none"  # ALST tiling: none | mlp | loss | mlp+loss (recipe keys tiled_mlp, tiled_loss)
    tp: int = 1  # AutoTP training size (the DeepSpeed JSON's tensor_parallel.autotp_size)
    reduce_scatter: bool = True  # zero_optimization.reduce_scatter in the DeepSpeed JSON (DeepSpeed's default: true)
    world: int | None = None  # number of processes, when known

    def values(self) -> dict:
        return dataclasses.asdict(self)


class Not(frozenset):
    """Concern value that matches anything outside the given values."""

    def __contains__(self, item) -> bool:
        return not frozenset.__contains__(self, item)

    def __repr__(self) -> str:
        return f"not {sorted(self, key=str)}"


@dataclass(frozen=True)
class Rule:
    id: str
    concerns: dict  # axis -> frozenset of values (or Not(...)); the rule fires when all match
    problem: str  # one line, may use {axis} placeholders (filled from the settings)
    fix: str
    key: str  # config key the error names
    file: str = "recipe"  # whose file the error names: recipe | deepspeed
    refused: bool = True  # False: works, degraded (a note, not an error)
    issue: str | None = None  # upstream issue
    components: tuple = ()  # run-time components that enforce it besides `dsrecipes check` and the start-up check
    when: object = None  # optional predicate Settings -> bool, for conditions a value set cannot say (sp < world)

    def matches(self, s: Settings) -> bool:
        if not all(getattr(s, axis) in vals for axis, vals in self.concerns.items()):
            return False
        return self.when is None or bool(self.when(s))

    def text(self, s: Settings) -> str:
        return self.problem.format(**s.values())

    def error(self, s: Settings, paths: dict) -> ConfigError:
        where = paths.get(self.file) or f"<{self.file}>"
        return ConfigError(where, self.key, self.text(s), self.fix.format(**s.values()))


def _set(*values) -> frozenset:
    return frozenset(values)


FROZEN = _set("static", "progressive")
OFFLOADED = _set("cpu", "nvme")
DS_STAGES = _set(0, 1, 2, 3)
LORA = _set("lora", "qlora")

RULES: tuple[Rule, ...] = (
    Rule(
        "zero3_frozen_reentrant",
        {"zero": _set(3), "freeze": FROZEN, "checkpointing": _set("hf_full_reentrant", "every_k_reentrant")},
        "ZeRO-3 with frozen parameters and reentrant checkpointing loses gradients (transformers #21381)",
        "set gradient_checkpointing_reentrant: false",
        key="gradient_checkpointing_reentrant",
        issue="huggingface/transformers#21381",
    ),
    Rule(
        "progressive_zero3",
        {"freeze": _set("progressive"), "zero": _set(3)},
        "progressive freezing rebuilds the engine at each freeze point, supported for ZeRO 0-2 without offload "
        "(dsrecipes.freezing.rebuild; ZeRO-3 partitions the parameters themselves)",
        "use ZeRO 0, 1 or 2, or static freezing (freeze_embeddings, freeze_first_n_blocks) with ZeRO-3",
        key="freeze_schedule",
        components=("rebuild",),
    ),
    Rule(
        "progressive_offload",
        {"freeze": _set("progressive"), "offload": OFFLOADED},
        "progressive freezing rebuilds the engine at each freeze point, supported for ZeRO 0-2 without offload "
        "(DeepSpeedCPUAdam state is not carried over)",
        "use a config without offload_optimizer, or static freezing with offload",
        key="freeze_schedule",
        components=("rebuild",),
    ),
    Rule(
        "progressive_zero0_low_precision",
        {"freeze": _set("progressive"), "zero": _set(0), "precision": _set("bf16", "fp16")},
        "progressive freezing with ZeRO-0 and {precision} is not supported: DeepSpeed's stage-0 mixed-precision "
        "optimizer keeps fp32 copies whose Adam state cannot be carried over",
        "use ZeRO-1 or 2 with {precision}, or ZeRO-0 in fp32",
        key="freeze_schedule",
        components=("rebuild",),
    ),
    Rule(
        "progressive_needs_adamw",
        {"freeze": _set("progressive"), "zero": DS_STAGES, "optimizer": frozenset(NON_ADAMW)},
        "progressive freezing under DeepSpeed carries AdamW state only, not {optimizer}",
        "use optimizer: adamw",
        key="freeze_schedule",
        components=("rebuild",),
    ),
    Rule(
        "offload_needs_adamw",
        {"offload": OFFLOADED, "optimizer": frozenset(NON_ADAMW)},
        "{optimizer} cannot be offloaded by ZeRO-Offload (only DeepSpeed's CPU Adam runs there)",
        "use optimizer: adamw with offload, or a config without offload_optimizer",
        key="optimizer",
    ),
    Rule(
        "offload_ds_optimizer_type",
        {"offload": OFFLOADED, "ds_optimizer": Not(("",) + OFFLOADABLE_DS_OPTIMIZERS)},
        "{ds_optimizer!r} cannot run on the offload device",
        "use Adam/AdamW/Adagrad/Lion with offload_optimizer, or drop the offload",
        key="optimizer.type",
        file="deepspeed",
    ),
    Rule(
        "param_offload_needs_zero3",
        {"offload_param": OFFLOADED, "zero": _set(0, 1, 2)},
        "parameter offload needs ZeRO stage 3",
        "set zero_optimization.stage to 3 or remove offload_param",
        key="zero_optimization.offload_param",
        file="deepspeed",
    ),
    # bitsandbytes 8-bit quantizes DeepSpeed's flat fp32 partitions fine (ZeRO 0-3, tests/test_memory.py); torchao
    # quantizes only tensors that are a multiple of its block, which ZeRO's flat partitions are not.
    Rule(
        "torchao_under_zero",
        {"zero": _set(1, 2, 3), "optimizer": frozenset(LOW_BIT_TORCHAO)},
        "{optimizer} keeps fp32 state under ZeRO-{zero} (torchao quantizes only tensors that are a multiple of its "
        "block; ZeRO hands it flat partitions)",
        "use adamw_8bit (bitsandbytes) with ZeRO 1-3, or torchao with plain DDP or ZeRO-0",
        key="optimizer",
    ),
    Rule(
        "cpu_checkpointing_on_cpu",
        {"device": _set("cpu"), "cpu_checkpointing": _set(True)},
        "breaks on the CPU accelerator (tensors are already on the CPU; backward fails)",
        "set it to false on CPU runs",
        key="activation_checkpointing.cpu_checkpointing",
        file="deepspeed",
        components=("activation_checkpointing",),
    ),
    Rule(
        "pipeline_section_through_accelerate",
        {"ds_pipeline": _set(True), "recipe": _set("train_lm", "distill")},
        "has no effect through accelerate (accelerate #2838)",
        "remove it and use recipes/train_pipeline.py for pipeline parallelism",
        key="pipeline",
        file="deepspeed",
        issue="huggingface/accelerate#2838",
    ),
    Rule(
        "pipeline_zero23",
        {"recipe": _set("pipeline"), "zero": _set(2, 3)},
        "ZeRO-{zero} cannot be combined with pipeline parallelism (DeepSpeed's pipeline engine supports ZeRO 0 and "
        "1 only)",
        f"use {DEFAULT_PIPELINE_DS} (accelerate launch --deepspeed_config_file {DEFAULT_PIPELINE_DS})",
        key="zero_optimization.stage",
        file="deepspeed",
        components=("pipeline",),
    ),
    Rule(
        "pipeline_progressive",
        {"recipe": _set("pipeline"), "freeze": _set("progressive")},
        "progressive freezing rebuilds the engine at each freeze point, which the pipeline recipe does not do "
        "(a PipelineModule's stages are built once by deepspeed.initialize)",
        "use static freezing (freeze_embeddings, freeze_first_n_blocks, freeze_patterns) with the pipeline",
        key="freeze_schedule",
        components=("pipeline",),
    ),
    Rule(
        "pipeline_prefix_cache",
        {"recipe": _set("pipeline"), "cache": _set("memory", "disk")},
        "the frozen-prefix cache replaces the HF model's forward, which a pipeline stage does not run",
        "set freeze_cache: none (static freezing alone works with the pipeline)",
        key="freeze_cache",
        components=("pipeline",),
    ),
    # `--resume_from latest` on another world size turns load_universal on for that one load (train/elastic.py);
    # set in the JSON it is on for the whole run: at every save and at every later start.
    Rule(
        "load_universal_zero3",
        {"load_universal": _set(True), "zero": _set(3)},
        "set at save time under ZeRO-3, DeepSpeed writes only rank 0's model states, so every later checkpoint is "
        "broken (DeepSpeed #7546)",
        "leave it unset: --resume_from latest on another world size turns it on for that load only",
        key="checkpoint.load_universal",
        file="deepspeed",
        issue="deepspeedai/DeepSpeed#7546",
    ),
    Rule(
        "load_universal_by_hand",
        {"load_universal": _set(True), "zero": _set(0, 1, 2)},
        "makes every start load a universal checkpoint (latest_universal): resuming the run's own checkpoints fails "
        "until each is converted, and ZeRO-0 has no universal format (DeepSpeed #7200)",
        "leave it unset: --resume_from latest on another world size converts the checkpoint and turns it on for "
        "that load only",
        key="checkpoint.load_universal",
        file="deepspeed",
        issue="deepspeedai/DeepSpeed#7200",
    ),
    Rule(
        "cache_off_under_every_k",
        {"cache": _set("memory", "disk"), "checkpointing": _set("every_k", "every_k_reentrant")},
        "works, degraded: the frozen-prefix cache turns itself off under every_k checkpointing (each segment runs "
        "from its first block, so frozen blocks cannot be skipped one by one)",
        "use gradient_checkpointing: full or none to get the cache's speed-up",
        key="freeze_cache",
        refused=False,
    ),
    Rule(
        "cache_off_under_zero3",
        {"cache": _set("memory", "disk"), "zero": _set(3)},
        "works, degraded: the frozen-prefix cache turns itself off under ZeRO-3 (its module hooks gather each "
        "block's parameters and must see every block run)",
        "use ZeRO 0-2 to get the cache's speed-up",
        key="freeze_cache",
        refused=False,
    ),
)
# LoRA (config/rules_lora.py), sequence parallelism (config/rules_sp.py) and AutoTP training (config/rules_tp.py)
# keep their rules in their own modules; they are part of this one table.
from dsrecipes.config.rules_lora import LORA_RULES  # noqa: E402
from dsrecipes.config.rules_sp import SP_RULES  # noqa: E402
from dsrecipes.config.rules_tp import TP_RULES  # noqa: E402

RULES = RULES + LORA_RULES + SP_RULES + TP_RULES
BY_ID = {r.id: r for r in RULES}


# ----------------------------------------------------------------------------- settings from the sources
def _device(value) -> str:
    return "none" if value in (None, "none", False) else str(value)


def checkpointing_mode(mode: str | None, reentrant: bool) -> str:
    mode = mode or "none"
    if mode == "full":
        return "hf_full_reentrant" if reentrant else "hf_full"
    if mode == "every_k":
        return "every_k_reentrant" if reentrant else "every_k"
    return mode


def precision_of(ds: dict | None, mixed_precision: str | None) -> str:
    """bf16/fp16 when the DeepSpeed JSON switches it on, else what accelerate's mixed_precision says."""
    for prec in ("bf16", "fp16"):
        if ds and _get(ds, f"{prec}.enabled") is True:
            return prec
    return mixed_precision if mixed_precision in ("bf16", "fp16") else "no"


def settings_from(
    recipe: dict,
    ds: dict | None,
    acc: dict | None = None,
    world_size: int | None = None,
    on_cpu: bool | None = None,
    recipe_kind: str = "train_lm",
) -> Settings:
    """Normalise (recipe values, DeepSpeed dict, accelerate values, world size, on_cpu) onto the table's axes.
    `recipe` holds YAML keys or vars(args); `ds` None or {} means no DeepSpeed config."""
    ds, acc = ds or {}, acc or {}
    stage = _get(ds, "zero_optimization.stage", 0)
    progressive = recipe.get("freeze_schedule", "none") not in ("none", None)
    static = any(recipe.get(k) for k in ("freeze_embeddings", "freeze_first_n_blocks", "freeze_patterns"))
    reentrant = bool(recipe.get("gradient_checkpointing_reentrant"))
    rank, quant = recipe.get("lora_r") or 0, recipe.get("lora_quantize") not in (None, "none")
    lora = "none" if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 else "qlora" if quant else "lora"
    return Settings(
        zero=int(stage) if ds and stage in DS_STAGES and not isinstance(stage, bool) else None,
        offload=_device(_get(ds, "zero_optimization.offload_optimizer.device")),
        offload_param=_device(_get(ds, "zero_optimization.offload_param.device")),
        checkpointing=checkpointing_mode(recipe.get("gradient_checkpointing"), reentrant),
        optimizer=recipe.get("optimizer") or "adamw",
        precision=precision_of(ds, acc.get("mixed_precision")),
        freeze="progressive" if progressive else "static" if static else "none",
        cache=recipe.get("freeze_cache") or "none",
        recipe=recipe_kind,
        device=None if on_cpu is None else ("cpu" if on_cpu else "gpu"),
        ds_optimizer=str(_get(ds, "optimizer.type", "") or "").lower(),
        cpu_checkpointing=_get(ds, "activation_checkpointing.cpu_checkpointing") is True,
        ds_pipeline="pipeline" in ds,
        load_universal=_get(ds, "checkpoint.load_universal") is True,
        lora=lora,
        sp=sp_size(recipe),
        tiling="+".join(t for t, k in (("mlp", "tiled_mlp"), ("loss", "tiled_loss")) if recipe.get(k) is True)
        or "none",
        tp=autotp_size(ds),
        reduce_scatter=_get(ds, "zero_optimization.reduce_scatter") is not False,
        world=world_size if isinstance(world_size, int) and not isinstance(world_size, bool) else None,
    )


def settings_for_run(accelerator, args, recipe_kind: str = "train_lm") -> Settings:
    """The settings of a running recipe: its args, the accelerator's DeepSpeed config, precision and device."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    ds = plugin.deepspeed_config if plugin is not None else None
    device = getattr(getattr(accelerator, "device", None), "type", None)
    return settings_from(
        vars(args),
        ds,
        {"mixed_precision": getattr(accelerator, "mixed_precision", None)},
        getattr(accelerator, "num_processes", None),
        None if device is None else device == "cpu",
        recipe_kind,
    )


# ----------------------------------------------------------------------------- asking the table
def fired(s: Settings, refused: bool | None = True, component: str | None = None) -> list[Rule]:
    """The rules that fire for these settings (refused=None: refusals and notes)."""
    out = [r for r in RULES if r.matches(s) and (refused is None or r.refused == refused)]
    return [r for r in out if component is None or component in r.components]


def refusals(s: Settings, paths: dict | None = None, component: str | None = None) -> list[ConfigError]:
    """One ConfigError per refusing rule. paths: {"recipe": file, "deepspeed": file} named in the errors."""
    return [r.error(s, paths or {}) for r in fired(s, True, component)]


def notes(s: Settings) -> list[str]:
    """The "works, degraded" lines for these settings."""
    return [r.text(s) for r in fired(s, False)]


def raise_first(s: Settings, where: str | dict, component: str) -> None:
    """What a component checks at run time: the first refusing rule it enforces, as a ConfigError."""
    paths = where if isinstance(where, dict) else {"recipe": where, "deepspeed": where}
    errs = refusals(s, paths, component)
    if errs:
        raise errs[0]


def pipeline_refusals(args, ds: dict, ds_path: str, where: str, precision: str = "no", on_cpu: bool | None = None):
    """The table's refusals for recipes/train_pipeline.py (ZeRO-2/3, progressive freezing, and every other rule
    that applies to these settings): [ConfigError], the DeepSpeed ones naming ds_path, the others `where`."""
    s = settings_from(vars(args), ds, {"mixed_precision": precision}, None, on_cpu, recipe_kind="pipeline")
    return refusals(s, {"recipe": where, "deepspeed": ds_path})
