"""Per-file linting for `dsrecipes check`: one accelerate YAML, one DeepSpeed JSON or one recipe YAML at a time.

    errs = lint_deepspeed(load_json(path), path)      # unknown keys, "auto" nothing fills, numbers as strings, ...
    errs = lint_accelerate(load_yaml(path), path)
    errs = lint_recipe(load_yaml(path), path)

Keys, types and ranges come from the libraries themselves (validate.py: DeepSpeed's pydantic models and the keys
DeepSpeedConfig reads, accelerate's ClusterConfig); the recipe fields' ranges are limits.py's.
What needs several files (a value set twice, batch arithmetic) is check.cross_check; which techniques combine is
the rule table in rules.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from dsrecipes.config import args as recipe_args
from dsrecipes.config import validate
from dsrecipes.config.deepspeed import FILLED_AUTO
from dsrecipes.config.errors import ConfigError

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


def get(d: dict, dotted: str, default=None):
    """d["a"]["b"] for "a.b", or default."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


_get = get


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
    errs = validate.shape_errors(ds, path)
    if errs:  # a section that is not an object: the checks below read every section as a dict
        return errs
    top_keys = validate.ds_top_keys()  # what DeepSpeedConfig itself reads (None without DeepSpeed)
    for key in ds:
        if top_keys is not None and key not in top_keys:
            errs.append(
                ConfigError(
                    path, key, "unknown DeepSpeed key", "remove it or fix the spelling (see the DeepSpeed config docs)"
                )
            )
    zero = ds.get("zero_optimization", {}) or {}
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
    from dsrecipes.config.nvme import lint_nvme

    errs += lint_nvme(ds, path)
    try:
        seen = {e.key for e in errs}
        errs += [e for e in validate.validate_deepspeed(ds, path) if e.key not in seen]
    except ImportError:  # no pydantic/DeepSpeed: the checks above only
        pass
    return errs


def lint_accelerate(acc: dict, path: str) -> list[ConfigError]:
    from accelerate.commands.config.config_args import ClusterConfig

    if not acc:
        return validate.validate_accelerate(acc, path)  # one line: the file is empty
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
    ds_cfg = ds_cfg if isinstance(ds_cfg, dict) else {}  # not a mapping: validate_accelerate's error
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
    seen = {e.key for e in errs}
    return errs + [e for e in validate.validate_accelerate(acc, path) if e.key not in seen]


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
