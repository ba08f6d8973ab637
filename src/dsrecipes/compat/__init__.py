"""Every workaround for a library bug, and every private attribute of a library that dsrecipes touches, in one place.

    python -m dsrecipes.compat        # each workaround, the version it was written for, the installed one, re-check?

Each workaround names the package and the last version it was verified against (VERIFIED) and its upstream issue
(or "no upstream issue found"). When the installed version is newer, the first use warns once (CompatWarning):
the workaround still runs, and the warning says which issue to re-check so it can be deleted after an upgrade.
A private attribute that disappeared raises a RuntimeError naming the workaround, instead of an AttributeError deep
inside a training step. Importing this package imports no torch (the planner CLI stays light).

    compat/registry.py    Workaround, WORKAROUNDS, guard, outdated, _version (cached), _private, report
    compat/deepspeed.py   DeepSpeed: universal checkpoints, ZeRO partitions, the pipeline engine, the SP gradient scale
    compat/hf.py          accelerate, transformers and torch

This module re-exports all of them: `from dsrecipes import compat; compat.guard(...)` and
`from dsrecipes.compat import guard` both work.
"""

from dsrecipes.compat.deepspeed import (
    _repair_zero3_universal_state,
    drop_frozen_tied_weights,
    flag_pipeline_params_for_clipping,
    install_pipe_instruction_table,
    keep_zero3_init_dtype,
    load_universal_for_this_load,
    pipe_instruction_table,
    pipe_stage_of_rank,
    sp_gradient_scale,
    zero_full_fp32,
)
from dsrecipes.compat.hf import (
    accelerator_dataloaders,
    attn_implementation,
    fix_cpu_deepspeed_world_size,
    hf_init_weights,
    is_traceable_wrapper_subclass,
    multi_cpu_launched_alone,
    set_attn_implementation,
    set_gradient_checkpointing_func,
    set_scheduler_last_lr,
    transformers_optimization,
    without_hf_deepspeed_config,
)
from dsrecipes.compat.registry import (
    WORKAROUNDS,
    CompatWarning,
    Workaround,
    _private,
    _version,
    _warned,
    guard,
    outdated,
    report,
)

__all__ = [
    "CompatWarning",
    "WORKAROUNDS",
    "Workaround",
    "_private",
    "_repair_zero3_universal_state",
    "_version",
    "_warned",
    "accelerator_dataloaders",
    "attn_implementation",
    "drop_frozen_tied_weights",
    "fix_cpu_deepspeed_world_size",
    "flag_pipeline_params_for_clipping",
    "guard",
    "hf_init_weights",
    "install_pipe_instruction_table",
    "is_traceable_wrapper_subclass",
    "keep_zero3_init_dtype",
    "load_universal_for_this_load",
    "multi_cpu_launched_alone",
    "outdated",
    "pipe_instruction_table",
    "pipe_stage_of_rank",
    "report",
    "set_attn_implementation",
    "set_gradient_checkpointing_func",
    "set_scheduler_last_lr",
    "sp_gradient_scale",
    "transformers_optimization",
    "without_hf_deepspeed_config",
    "zero_full_fp32",
]
