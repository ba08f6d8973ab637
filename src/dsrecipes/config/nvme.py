"""ZeRO-Infinity NVMe offload (configs/deepspeed/zero3_nvme.json): the checks that turn DeepSpeed's late failures
into one-line errors at start-up.

`check_nvme(ds, on_cpu, where)` returns a ConfigError for each problem in a DeepSpeed config dict whose
`zero_optimization.offload_param` / `offload_optimizer` has `device: nvme`:
- `nvme_path` must be an existing, writable directory (the shipped `/local_nvme` is a placeholder to edit);
- DeepSpeed's async_io op must build here: it needs libaio (Debian: `apt-get install libaio-dev`); without it the
  engine dies in a JIT build with a compiler traceback. On CPU the op builds and runs once libaio is installed
  (measured: tests/test_offload.py::test_recipe_zero3_nvme_offload_to_a_temporary_directory_2proc).
- `pin_memory: true` is kept: on the CPU accelerator DeepSpeed's pin_memory op is a no-op there, not an error.
A config without NVMe offload gives []. `dsrecipes check` runs lint_nvme (the config itself: the shipped
nvme_path `/local_nvme` is a path on the target machine); the recipes' start-up check adds check_nvme_machine.
Parameter offload without ZeRO-3 is a rule of the table (dsrecipes.config.rules.param_offload_needs_zero3).
"""

from __future__ import annotations

import functools
import os

from dsrecipes.config.errors import ConfigError

SECTIONS = ("offload_param", "offload_optimizer")


@functools.lru_cache(maxsize=1)
def aio_op_builds() -> bool:
    """Whether DeepSpeed's async_io op can be built here (libaio headers and library found)."""
    import contextlib
    import io

    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stdout(io.StringIO()):  # it prints install hints itself; ours is the one line
        return bool(AsyncIOBuilder().is_compatible(verbose=False))


def nvme_sections(ds: dict) -> list[str]:
    zero = (ds or {}).get("zero_optimization") or {}
    return [s for s in SECTIONS if isinstance(zero.get(s), dict) and zero[s].get("device") == "nvme"]


def lint_nvme(ds: dict, where: str) -> list[ConfigError]:
    """What is wrong with the config itself, wherever it runs (`dsrecipes check` and the start-up check, via
    lint.lint_deepspeed). Parameter offload without ZeRO-3 is the rule table's param_offload_needs_zero3."""
    zero = (ds or {}).get("zero_optimization") or {}
    return [
        ConfigError(
            where,
            f"zero_optimization.{s}.nvme_path",
            "missing for device nvme",
            "set it to a directory on a local NVMe",
        )
        for s in nvme_sections(ds)
        if not zero[s].get("nvme_path")
    ]


def check_nvme_machine(ds: dict, on_cpu: bool, where: str, aio_builds=aio_op_builds) -> list[ConfigError]:
    """What fails on this machine (the recipes' start-up check, check.check_run): the NVMe path and the async_io op.
    aio_builds: the probe (tests pass a stand-in)."""
    nvme = nvme_sections(ds)
    errors: list[ConfigError] = []
    if not nvme:
        return errors
    zero = ds["zero_optimization"]
    for section in nvme:
        key = f"zero_optimization.{section}.nvme_path"
        path = zero[section].get("nvme_path")
        if not path:
            continue  # lint_nvme's line
        if not os.path.isdir(path):
            errors.append(
                ConfigError(
                    where,
                    key,
                    f"{path} is not a directory",
                    "point it at a directory on a fast local disk (a temporary directory works on CPU)",
                )
            )
        elif not os.access(path, os.W_OK | os.X_OK):
            errors.append(ConfigError(where, key, f"{path} is not writable", "use a directory this user can write"))
    if not aio_builds():
        where_run = "this CPU machine" if on_cpu else "this machine"
        errors.append(
            ConfigError(
                where,
                f"zero_optimization.{nvme[0]}.device",
                f"nvme offload needs DeepSpeed's async_io op, which cannot build on {where_run} (libaio not found)",
                "install libaio-dev (apt-get install libaio-dev) or use device: cpu (zero3_offload.json)",
            )
        )
    return errors


def check_nvme(ds: dict, on_cpu: bool, where: str, machine: bool = True, aio_builds=aio_op_builds) -> list[ConfigError]:
    """Both of the above; machine=False: only the config itself (linting before the target machine exists)."""
    errors = lint_nvme(ds, where)
    return errors + (check_nvme_machine(ds, on_cpu, where, aio_builds) if machine else [])
