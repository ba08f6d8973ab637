"""Validation against the libraries' own config classes, so keys, types and ranges stay in step with the pins.

    errs = validate_deepspeed(ds, path)     # DeepSpeed's pydantic models (ZeRO, offload, fp16/bf16, comms_logger, ...)
    errs = validate_accelerate(acc, path)   # accelerate's ClusterConfig field types and enums, counts >= 1
    keys = ds_top_keys()                    # every top-level key DeepSpeedConfig reads (None without DeepSpeed)

Each problem is one ConfigError (file, dotted key, the library's message shortened, a fix). "auto" is accepted
exactly at config.deepspeed.FILLED_AUTO: a valid placeholder stands in for it before pydantic sees the section;
other "auto" values and numbers-as-strings are lint.py's errors and are left out here so each shows once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing

from dsrecipes.config.deepspeed import FILLED_AUTO
from dsrecipes.config.errors import ConfigError

# top-level keys DeepSpeedConfig does not read but that are still valid: a JSON comment, and "msamp", which
# accelerate writes for fp8 through MS-AMP (read by MS-AMP's DeepSpeed integration)
EXTRA_TOP_KEYS = frozenset({"_comment", "msamp"})
# placeholder for a FILLED_AUTO key before pydantic validation (the real value comes from fill_auto / accelerate)
_PLACEHOLDER = {"bf16.enabled": False, "fp16.enabled": False}
# top-level scalars DeepSpeed reads without a model: (kind, minimum)
DS_SCALARS = {
    "train_batch_size": (int, 1),
    "train_micro_batch_size_per_gpu": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "steps_per_print": (float, 1),  # accelerate writes inf there
    "gradient_clipping": (float, 0),
    "gradient_predivide_factor": (float, 0),
}


@functools.lru_cache(maxsize=1)
def ds_top_keys() -> frozenset | None:
    """The top-level keys DeepSpeedConfig looks up: build one from a dict that records every lookup."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:  # linting works without DeepSpeed, with fewer checks
        return None
    seen: set = set()

    class Keys(list):
        def __contains__(self, k):
            seen.add(k)
            return list.__contains__(self, k)

    class Recording(dict):
        def __getitem__(self, k):
            seen.add(k)
            return dict.__getitem__(self, k)

        def get(self, k, default=None):
            seen.add(k)
            return dict.get(self, k, default)

        def __contains__(self, k):
            seen.add(k)
            return dict.__contains__(self, k)

        def keys(self):
            return Keys(dict.keys(self))

        def copy(self):
            return Recording(dict(self))

    try:
        DeepSpeedConfig(Recording({"train_batch_size": 1}))
    except Exception:  # a DeepSpeed that reads its config differently: keep what was recorded so far
        pass
    return frozenset(k for k in seen if isinstance(k, str)) | EXTRA_TOP_KEYS if len(seen) > 20 else None


def _section_models() -> dict:
    """DeepSpeed section name -> its pydantic model (those this DeepSpeed has)."""
    out = {}
    for section, module, name in [
        ("zero_optimization", "deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
        ("bf16", "deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
        ("bfloat16", "deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
        ("fp16", "deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
        ("comms_logger", "deepspeed.comm.config", "CommsLoggerConfig"),
        ("tensorboard", "deepspeed.monitor.config", "TensorBoardConfig"),
        ("wandb", "deepspeed.monitor.config", "WandbConfig"),
        ("csv_monitor", "deepspeed.monitor.config", "CSVConfig"),
        ("comet", "deepspeed.monitor.config", "CometConfig"),
        ("timers", "deepspeed.utils.config", "DeepSpeedThroughputTimerConfig"),
        ("compile", "deepspeed.compile.config", "CompileConfig"),
        ("hybrid_engine", "deepspeed.runtime.config", "HybridEngineConfig"),
    ]:
        try:
            mod = __import__(module, fromlist=[name])
            out[section] = getattr(mod, name)
        except (ImportError, AttributeError):
            pass
    return out


def _strip_auto(node, prefix: str):
    """A copy with FILLED_AUTO "auto" replaced by a placeholder and every other "auto" dropped."""
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _strip_auto(value, dotted + ".")
        elif value == "auto":
            if dotted in FILLED_AUTO:
                out[key] = _PLACEHOLDER.get(dotted, 1)
        else:
            out[key] = value
    return out


_FIX = {
    "extra_forbidden": "remove it or fix the spelling (see the DeepSpeed config docs)",
    "enum": "use one of those",
    "literal_error": "use one of those",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "int_from_float": "write a whole number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "float_parsing": "write a number",
    "dict_type": "write an object {...}",
    "missing": "add it",
}


def _pydantic_errors(exc, section: str, path: str, model) -> list[ConfigError]:
    errs = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if not str(p).startswith("function-")]
        key = ".".join([section, *loc])
        msg = e.get("msg", "invalid value").removeprefix("Value error, ").split("\n")[0]
        fix = _FIX.get(e.get("type"), "see the DeepSpeed config docs")
        if e.get("type") == "extra_forbidden":
            msg = "unknown DeepSpeed key"
            names = list(model.model_fields) + [f.alias for f in model.model_fields.values() if f.alias]
            near = difflib.get_close_matches(loc[-1], names, n=2, cutoff=0.7) if len(loc) == 1 else []
            fix = f"remove it or fix the spelling (did you mean {' or '.join(near)}?)" if near else fix
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{e['input']!r}: {msg[:1].lower()}{msg[1:]}"
        errs.append(ConfigError(path, key, msg, fix))
    return errs


OBJECT_SECTIONS = (
    "zero_optimization",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "bfloat16",
    "activation_checkpointing",
)


def shape_errors(ds: dict, path: str) -> list[ConfigError]:
    """Sections that must be objects but are not (every later check reads them as dicts)."""
    return [
        ConfigError(path, s, f"expected an object, got {ds[s]!r}", f'write "{s}": {{...}}')
        for s in dict.fromkeys(OBJECT_SECTIONS + tuple(_section_models()))
        if s in ds and not isinstance(ds[s], dict)
    ]


def validate_deepspeed(ds: dict, path: str) -> list[ConfigError]:
    """DeepSpeed's own models on each section, its scalar ranges, scheduler names, fp16 + bf16 together."""
    from pydantic import ValidationError

    errs = []
    clean = _strip_auto(ds, "")
    for section, model in _section_models().items():
        value = clean.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):  # shape_errors
            continue
        try:
            model(**value)
        except ValidationError as exc:
            errs += _pydantic_errors(exc, section, path, model)
        except (TypeError, ValueError, AssertionError) as exc:
            errs.append(ConfigError(path, section, str(exc).split("\n")[0][:160], "see the DeepSpeed config docs"))
    for key, (kind, low) in DS_SCALARS.items():
        value = clean.get(key)
        if value is None or isinstance(value, str):  # unset, or a string lint.py reports
            continue
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if ok and kind is int:
            ok = isinstance(value, int) or float(value).is_integer()
        if not ok:
            want = "a whole number" if kind is int else "a number"
            errs.append(ConfigError(path, key, f"expected {want}, got {value!r}", f'write {want} >= {low} or "auto"'))
        elif value < low:
            errs.append(ConfigError(path, key, f"{value!r} is below {low}", f'write a value >= {low} or "auto"'))
    sched = clean.get("scheduler")
    if isinstance(sched, dict) and sched.get("type") is not None:
        try:
            from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
        except ImportError:
            VALID_LR_SCHEDULES = None
        if VALID_LR_SCHEDULES and sched["type"] not in VALID_LR_SCHEDULES:
            errs.append(
                ConfigError(
                    path,
                    "scheduler.type",
                    f"{sched['type']!r} is not a DeepSpeed scheduler",
                    f"use one of {list(VALID_LR_SCHEDULES)} or drop the section (the recipe's lr_scheduler_type)",
                )
            )
    fp16 = (ds.get("fp16") or {}).get("enabled") if isinstance(ds.get("fp16"), dict) else None
    bf16 = next((ds[s].get("enabled") for s in ("bf16", "bfloat16") if isinstance(ds.get(s), dict)), None)
    if fp16 is True and bf16 is True:
        errs.append(
            ConfigError(
                path,
                "bf16.enabled",
                "fp16 and bf16 are both enabled; DeepSpeed refuses that",
                'enable one, or write "auto" in both so mixed_precision decides',
            )
        )
    return errs


# ----------------------------------------------------------------------------- accelerate
def _enum_values(name: str) -> list[str] | None:
    try:
        import accelerate.utils.dataclasses as acc_dc

        return [m.value for m in getattr(acc_dc, name)]
    except (ImportError, AttributeError):
        return None


ACC_ENUMS = {
    "compute_environment": "ComputeEnvironment",
    "distributed_type": "DistributedType",
    "mixed_precision": "PrecisionType",
}
ACC_BOOL_WORDS = ("no", "yes", "true", "false")
ACC_MIN = {"num_processes": 1, "num_machines": 1, "machine_rank": 0, "main_process_port": 1}


def _acc_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _acc_type(args[0]) if len(args) == 1 else None
    tp = origin or tp
    return tp if tp in (int, str, bool, dict, list, float) else None


def validate_accelerate(acc: dict, path: str) -> list[ConfigError]:
    """ClusterConfig's field types and enum values; counts and ports in range. Unknown keys are lint.py's."""
    from accelerate.commands.config.config_args import ClusterConfig

    if not acc:
        return [
            ConfigError(
                path,
                "-",
                "empty accelerate config",
                "write at least distributed_type and num_processes (see configs/accelerate/)",
            )
        ]
    errs = []
    hints = typing.get_type_hints(ClusterConfig)
    for f in dataclasses.fields(ClusterConfig):
        if f.name not in acc or acc[f.name] is None:
            continue
        value, want = acc[f.name], None
        if f.name in ACC_ENUMS:
            values = _enum_values(ACC_ENUMS[f.name])
            if values and value not in values:
                errs.append(ConfigError(path, f.name, f"{value!r} is not one of {values}", "pick one of those"))
            continue
        want = _acc_type(hints.get(f.name))
        if want is None or isinstance(value, str) and want in (int, float):  # strings-as-numbers: lint.py
            continue
        bad = not isinstance(value, want) or (want in (int, float) and isinstance(value, bool))
        if want is bool and isinstance(value, str) and value.lower() in ACC_BOOL_WORDS:
            bad = False  # `accelerate config` itself writes downcast_bf16: 'no'
        if bad:
            errs.append(
                ConfigError(path, f.name, f"expected {want.__name__}, got {value!r}", f"write a {want.__name__} value")
            )
        elif f.name in ACC_MIN and value < ACC_MIN[f.name]:
            errs.append(
                ConfigError(path, f.name, f"{value!r} is below {ACC_MIN[f.name]}", f"use {ACC_MIN[f.name]} or more")
            )
    rank, machines = acc.get("machine_rank"), acc.get("num_machines", 1)
    if isinstance(rank, int) and isinstance(machines, int) and machines >= 1 and rank >= machines:
        errs.append(
            ConfigError(path, "machine_rank", f"{rank} but num_machines is {machines}", f"use 0..{machines - 1}")
        )
    dyn = acc.get("dynamo_config")
    backend = dyn.get("dynamo_backend") if isinstance(dyn, dict) else None
    values = _enum_values("DynamoBackend")
    if backend is not None and values and str(backend).upper() not in [str(v).upper() for v in values]:
        errs.append(
            ConfigError(
                path, "dynamo_config.dynamo_backend", f"{backend!r} is not one of {values}", "pick one of those"
            )
        )
    return errs
