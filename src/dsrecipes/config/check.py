"""`dsrecipes check`: lint accelerate YAML + DeepSpeed JSON + recipe YAML together, before any GPU is rented.

    dsrecipes check --accelerate A.yaml --deepspeed D.json --recipe R.yaml    (any subset)
    dsrecipes check --all                                                     (every shipped config)

Each problem prints as `error: FILE: KEY: what is wrong; how to fix it`; exit code 2 if any. Recipes call
`check_run()` at start-up with the values they actually got, so a bad launch fails in seconds.
Catches the pitfalls users report (see docs): a value set in two places, "auto" with nothing to fill it,
numbers as strings, batch arithmetic, `pipeline` through accelerate, ZeRO-3 + frozen params + reentrant
checkpointing, offload with an optimizer it cannot offload, cpu_checkpointing on CPU, unknown keys.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys

from dsrecipes.config import args as recipe_args
from dsrecipes.config.errors import ConfigError, ConfigErrors

# "auto" values that accelerate (or our recipes, see training.fill_deepspeed_from_recipe) fill in.
FILLED_AUTO = {
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
    "optimizer.params.lr",
    "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr",
    "scheduler.params.warmup_max_lr",
    "scheduler.params.warmup_num_steps",
    "scheduler.params.total_num_steps",
}
DS_TOP_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "bf16",
    "bfloat16",
    "fp16",
    "amp",
    "optimizer",
    "scheduler",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "aio",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "data_types",
    "elasticity",
    "pipeline",
    "autotuning",
    "checkpoint",
    "memory_breakdown",
    "dump_state",
    "sparse_attention",
    "data_efficiency",
    "compression_training",
    "curriculum_learning",
    "quantize_training",
    "nebula",
    "disable_allgather",
    "dataloader_drop_last",
    "load_universal_checkpoint",
    "use_node_local_storage",
    "graph_harvesting",
    "torch_autocast",
    "compile",
    "timers",
    "eigenvalue",
    "progressive_layer_drop",
    "weight_quantization",
    "hybrid_engine",
    "mics_shard_size",
    "mics_hierarchical_params_gather",
    "zero_quantized_weights",
    "zero_quantized_gradients",
    "zero_hpz_partition_size",
    "monitor_config",
    "gradient_accumulation_dtype",
    "_comment",
}
ACT_CKPT_KEYS = {
    "partition_activations",
    "contiguous_memory_optimization",
    "cpu_checkpointing",
    "number_checkpoints",
    "synchronize_checkpoint_boundary",
    "profile",
}
ACC_DS_KEYS = {
    "deepspeed_config_file",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_optimizer_nvme_path",
    "offload_param_nvme_path",
    "deepspeed_multinode_launcher",
    "deepspeed_hostfile",
    "deepspeed_exclusion_filter",
    "deepspeed_inclusion_filter",
    "deepspeed_moe_layer_cls_names",
}
# accelerate YAML deepspeed_config keys that accelerate ignores (or rejects) when a JSON file is given
ACC_DS_DUPLICATES = {
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping",
    "zero_stage": "zero_optimization.stage",
    "offload_optimizer_device": "zero_optimization.offload_optimizer.device",
    "offload_param_device": "zero_optimization.offload_param.device",
}
OFFLOADABLE_DS_OPTIMIZERS = {"adam", "adamw", "adagrad", "lion"}
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


# ----------------------------------------------------------------------------- loading
def load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(path, "-", "file not found", "pass an existing DeepSpeed JSON (see configs/deepspeed/)")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, "-", f"invalid JSON ({exc.msg} at line {exc.lineno})", "fix the JSON syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "-", "top level must be an object", "write a JSON object {...}")
    return data


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _walk(d, prefix=""):
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, key + ".")
        else:
            yield key, v


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------- per file
def lint_deepspeed(ds: dict, path: str) -> list[ConfigError]:
    errs = []
    for key in ds:
        if key not in DS_TOP_KEYS:
            errs.append(
                ConfigError(
                    path, key, "unknown DeepSpeed key", "remove it or fix the spelling (see the DeepSpeed config docs)"
                )
            )
    zero = ds.get("zero_optimization", {}) or {}
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zero_keys = set(DeepSpeedZeroConfig.model_fields)
        zero_keys |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
        for key in zero:
            if key not in zero_keys:
                errs.append(
                    ConfigError(path, f"zero_optimization.{key}", "unknown ZeRO key", "remove it or fix the spelling")
                )
    except ImportError:  # linting works without DeepSpeed installed, with fewer checks
        pass
    for key in ds.get("activation_checkpointing") or {}:
        if key not in ACT_CKPT_KEYS:
            errs.append(
                ConfigError(
                    path, f"activation_checkpointing.{key}", "unknown key", f"use one of {sorted(ACT_CKPT_KEYS)}"
                )
            )
    for key, value in _walk(ds):
        if value == "auto" and key not in FILLED_AUTO:
            errs.append(ConfigError(path, key, '"auto" but nothing fills this value', "write a concrete value"))
        elif isinstance(value, str) and _NUMBER.match(value):
            errs.append(
                ConfigError(path, key, f"number given as a string {value!r}", f"write it unquoted: {value.strip()}")
            )
    stage = zero.get("stage", 0)
    if _num(stage) is None or stage not in (0, 1, 2, 3):
        errs.append(ConfigError(path, "zero_optimization.stage", f"{stage!r} is not a ZeRO stage", "use 0, 1, 2 or 3"))
    if "pipeline" in ds:
        errs.append(
            ConfigError(
                path,
                "pipeline",
                "has no effect through accelerate (accelerate #2838)",
                "remove it and use recipes/train_pipeline.py for pipeline parallelism",
            )
        )
    off_dev = _get(ds, "zero_optimization.offload_optimizer.device", "none")
    opt_type = str(_get(ds, "optimizer.type", "")).lower()
    if off_dev not in ("none", None) and opt_type and opt_type not in OFFLOADABLE_DS_OPTIMIZERS:
        errs.append(
            ConfigError(
                path,
                "optimizer.type",
                f"{opt_type!r} cannot run on the offload device",
                "use Adam/AdamW/Adagrad/Lion with offload_optimizer, or drop the offload",
            )
        )
    if _get(ds, "zero_optimization.offload_param.device", "none") not in ("none", None) and stage != 3:
        errs.append(
            ConfigError(
                path,
                "zero_optimization.offload_param",
                "parameter offload needs ZeRO stage 3",
                "set zero_optimization.stage to 3 or remove offload_param",
            )
        )
    micro, ga, total = (
        _num(ds.get(k)) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    )
    if micro and ga and total and total % (micro * ga):
        errs.append(
            ConfigError(
                path,
                "train_batch_size",
                f"{total} is not a multiple of micro {micro} x accumulation {ga}",
                'set it to micro x accumulation x world size, or "auto"',
            )
        )
    return errs


def lint_accelerate(acc: dict, path: str) -> list[ConfigError]:
    from accelerate.commands.config.config_args import ClusterConfig

    errs = []
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    for key, value in acc.items():
        if key not in known:
            errs.append(
                ConfigError(
                    path, key, "unknown accelerate key", "remove it or fix the spelling (accelerate config --help)"
                )
            )
        elif (
            isinstance(value, str)
            and _NUMBER.match(value)
            and key in ("num_processes", "num_machines", "machine_rank", "main_process_port")
        ):
            errs.append(
                ConfigError(path, key, f"number given as a string {value!r}", f"write it unquoted: {value.strip()}")
            )
    ds_cfg = acc.get("deepspeed_config") or {}
    for key, value in ds_cfg.items():
        if key not in ACC_DS_KEYS:
            errs.append(
                ConfigError(path, f"deepspeed_config.{key}", "unknown key", f"use one of {sorted(ACC_DS_KEYS)}")
            )
        elif isinstance(value, str) and _NUMBER.match(value):
            errs.append(
                ConfigError(
                    path,
                    f"deepspeed_config.{key}",
                    f"number given as a string {value!r}",
                    f"write it unquoted: {value.strip()}",
                )
            )
    if ds_cfg.get("deepspeed_config_file"):
        for key in ACC_DS_DUPLICATES:
            if key in ds_cfg:
                errs.append(
                    ConfigError(
                        path,
                        f"deepspeed_config.{key}",
                        "set here and by deepspeed_config_file; accelerate ignores or rejects it",
                        f"set {ACC_DS_DUPLICATES[key]} in the JSON (or the recipe) only",
                    )
                )
    if acc.get("distributed_type") == "DEEPSPEED" and not ds_cfg:
        errs.append(
            ConfigError(path, "deepspeed_config", "missing for distributed_type DEEPSPEED", "add deepspeed_config_file")
        )
    return errs


def recipe_for(values: dict) -> str:
    """The registered recipe whose fields cover the YAML's keys best."""
    return min(recipe_args.RECIPES, key=lambda r: len(set(values) - recipe_args.field_names(recipe_args.RECIPES[r])))


def lint_recipe(values: dict, path: str, recipe: str | None = None) -> list[ConfigError]:
    types = recipe_args.RECIPES[recipe or recipe_for(values)]
    errs = []
    for key, value in values.items():
        try:
            recipe_args.validate_values({key: value}, types, path)
        except ConfigError as exc:
            errs.append(exc)
    return errs


# ----------------------------------------------------------------------------- across files
def cross_check(
    recipe: dict,
    ds: dict | None,
    acc: dict | None,
    world_size: int | None,
    rpath: str,
    dpath: str,
    apath: str,
    on_cpu: bool | None = None,
) -> list[ConfigError]:
    """Checks that need several sources. `recipe` holds the recipe's values (YAML keys or parsed args)."""
    errs = []
    ds = ds or {}
    acc = acc or {}
    pairs = [
        ("per_device_train_batch_size", "train_micro_batch_size_per_gpu"),
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
        ("max_grad_norm", "gradient_clipping"),
        ("learning_rate", "optimizer.params.lr"),
        ("weight_decay", "optimizer.params.weight_decay"),
    ]
    for rkey, dkey in pairs:
        rv, dv = recipe.get(rkey), _get(ds, dkey)
        if _num(rv) is not None and _num(dv) is not None and float(rv) != float(dv):
            errs.append(
                ConfigError(
                    dpath,
                    dkey,
                    f"{dv} here but {rkey}={rv} in {rpath}",
                    f'set it in one place: write "auto" here and keep {rkey} in the recipe',
                )
            )
    mp = acc.get("mixed_precision")
    for prec in ("bf16", "fp16"):
        enabled = _get(ds, f"{prec}.enabled")
        if isinstance(enabled, bool) and mp is not None and enabled != (mp == prec):
            errs.append(
                ConfigError(
                    dpath,
                    f"{prec}.enabled",
                    f"{enabled} here but mixed_precision={mp!r} in {apath}",
                    'write "auto" here so mixed_precision decides',
                )
            )
    world = world_size or _num(acc.get("num_processes"))
    micro = _num(ds.get("train_micro_batch_size_per_gpu")) or _num(recipe.get("per_device_train_batch_size"))
    ga = _num(ds.get("gradient_accumulation_steps")) or _num(recipe.get("gradient_accumulation_steps"))
    total = _num(ds.get("train_batch_size"))
    if total and micro and ga and world and total != micro * ga * world:
        errs.append(
            ConfigError(
                dpath,
                "train_batch_size",
                f"{total} != micro {micro} x accumulation {ga} x world size {world} = {micro * ga * world}",
                'write "auto" or the product',
            )
        )
    stage = _get(ds, "zero_optimization.stage", 0)
    progressive = recipe.get("freeze_schedule", "none") not in ("none", None)
    frozen = bool(
        recipe.get("freeze_embeddings")
        or recipe.get("freeze_first_n_blocks")
        or recipe.get("freeze_patterns")
        or progressive
    )
    reentrant = recipe.get("gradient_checkpointing") in ("full", "every_k") and recipe.get(
        "gradient_checkpointing_reentrant"
    )
    if stage == 3 and frozen and reentrant:
        errs.append(
            ConfigError(
                rpath,
                "gradient_checkpointing_reentrant",
                "ZeRO-3 with frozen parameters and reentrant checkpointing loses gradients (transformers #21381)",
                "set gradient_checkpointing_reentrant: false",
            )
        )
    if progressive and (
        stage == 3 or _get(ds, "zero_optimization.offload_optimizer.device", "none") not in ("none", None)
    ):
        errs.append(
            ConfigError(
                rpath,
                "freeze_schedule",
                "progressive freezing rebuilds the engine at each freeze point, "
                "supported for ZeRO 0-2 without offload (dsrecipes.freezing.rebuild)",
                "use ZeRO 0, 1 or 2, or static freezing (freeze_embeddings, freeze_first_n_blocks) with ZeRO-3",
            )
        )
    low = [k for k in ("bf16", "fp16") if _get(ds, f"{k}.enabled") is True or (mp == k and ds)]
    if progressive and ds and stage == 0 and low:
        errs.append(
            ConfigError(
                rpath,
                "freeze_schedule",
                f"progressive freezing with ZeRO-0 and {low[0]} cannot carry "
                "Adam state over (DeepSpeed's stage-0 mixed-precision optimizer keeps its own fp32 "
                "copies)",
                f"use ZeRO-1 or 2 with {low[0]}, or ZeRO-0 in fp32",
            )
        )
    offload = _get(ds, "zero_optimization.offload_optimizer.device", "none") not in ("none", None)
    optimizer = recipe.get("optimizer", "adamw")
    if offload and optimizer != "adamw":
        errs.append(
            ConfigError(
                rpath,
                "optimizer",
                f"{optimizer} cannot be offloaded by ZeRO-Offload (only DeepSpeed's CPU Adam runs there)",
                "use optimizer: adamw with offload, or a config without offload_optimizer",
            )
        )
    # bitsandbytes 8-bit quantizes DeepSpeed's flat fp32 partitions fine (ZeRO 0-3, tests/test_memory.py); torchao
    # quantizes only tensors that are a multiple of its block, which ZeRO's flat partitions are not: it would keep fp32.
    if stage in (1, 2, 3) and optimizer in ("torchao_adamw_8bit", "torchao_adamw_4bit"):
        errs.append(
            ConfigError(
                rpath,
                "optimizer",
                f"{optimizer} keeps fp32 state under ZeRO-{stage} (torchao quantizes "
                "only tensors that are a multiple of its block; ZeRO hands it flat partitions)",
                "use adamw_8bit (bitsandbytes) with ZeRO 1-3, or torchao with plain DDP or ZeRO-0",
            )
        )
    if on_cpu and _get(ds, "activation_checkpointing.cpu_checkpointing") is True:
        errs.append(
            ConfigError(
                dpath,
                "activation_checkpointing.cpu_checkpointing",
                "breaks on the CPU accelerator (tensors are already on the CPU; backward fails)",
                "set it to false on CPU runs",
            )
        )
    return errs


# ----------------------------------------------------------------------------- entry points
def lint_files(
    accelerate: str | None = None, deepspeed: str | None = None, recipe: str | None = None
) -> list[ConfigError]:
    errs: list[ConfigError] = []
    acc = ds = rec = None
    try:
        if accelerate:
            acc = recipe_args.load_yaml(accelerate)
            errs += lint_accelerate(acc, accelerate)
            deepspeed = deepspeed or (acc.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if deepspeed:
            ds = load_json(deepspeed)
            errs += lint_deepspeed(ds, deepspeed)
        if recipe:
            rec = recipe_args.load_yaml(recipe)
            errs += lint_recipe(rec, recipe)
    except ConfigError as exc:
        return errs + [exc]
    on_cpu = bool(acc.get("use_cpu")) if acc else None
    errs += cross_check(
        rec or {}, ds, acc, None, recipe or "<recipe>", deepspeed or "<deepspeed>", accelerate or "<accelerate>", on_cpu
    )
    return errs


def check_run(accelerator, args, config_path: str | None) -> None:
    """Start-up check inside a recipe: the same rules, on the values this run really has."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    errs: list[ConfigError] = []
    ds, dpath = None, "<deepspeed>"
    if plugin is not None:
        dpath = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "<deepspeed>"
        ds = plugin.deepspeed_config
        errs += lint_deepspeed(ds, dpath)
    acc = {"mixed_precision": accelerator.mixed_precision}
    errs += cross_check(
        vars(args),
        ds,
        acc,
        accelerator.num_processes,
        config_path or "<cli>",
        dpath,
        "<accelerate launch>",
        on_cpu=accelerator.device.type == "cpu",
    )
    if errs:
        raise ConfigErrors(errs)


def shipped_configs(root: str = "configs") -> list[tuple[str | None, str | None, str | None]]:
    out = [(a, None, None) for a in sorted(glob.glob(f"{root}/accelerate/*.yaml"))]
    out += [(None, d, None) for d in sorted(glob.glob(f"{root}/deepspeed/*.json"))]
    out += [(None, None, r) for r in sorted(glob.glob(f"{root}/recipes/*.yaml"))]
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--accelerate", help="accelerate config YAML")
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON (default: the one the accelerate YAML names)")
    parser.add_argument("--recipe", help="recipe config YAML")
    parser.add_argument("--all", action="store_true", help="lint every shipped config under configs/")


def run(ns) -> int:
    combos = shipped_configs() if ns.all else [(ns.accelerate, ns.deepspeed, ns.recipe)]
    if not any(any(c) for c in combos):
        print("error: <cli>: -: nothing to check; pass --accelerate, --deepspeed, --recipe or --all", file=sys.stderr)
        return 2
    errs = [e for combo in combos for e in lint_files(*combo)]
    for e in errs:
        print(e.line(), file=sys.stderr)
    if not errs:
        print(f"ok: {sum(1 for c in combos for x in c if x)} file(s) checked, no problems")
    return 2 if errs else 0
