"""The workarounds for accelerate, transformers and torch: accelerate's world size and launcher on CPU, its ZeRO-3
config registered with transformers, its private dataloader list; transformers' per-module init, checkpointing
function and attention kernel, its optimization module without peft; torch's LambdaLR position and tensor-subclass
check. Each calls guard() with its entry
in dsrecipes.compat.registry. Imports no torch (nor accelerate, transformers) at import time.
"""

from __future__ import annotations

import contextlib
import os
import sys

from dsrecipes.compat.registry import _private, guard


# ----------------------------------------------------------------------------- accelerate
def fix_cpu_deepspeed_world_size() -> None:
    """Tell accelerate's shared state the real world when DeepSpeed runs N ranks on its cpu accelerator."""
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return  # touching PartialState() here would fix plain torchrun + ACCELERATE_USE_CPU at one process
    guard("accelerate_cpu_deepspeed_world_size")
    state = PartialState()
    if (
        state.distributed_type == DistributedType.DEEPSPEED
        and dist.is_initialized()
        and state.num_processes != dist.get_world_size()
    ):
        state.num_processes = dist.get_world_size()
        state.process_index = dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def multi_cpu_launched_alone() -> bool:
    """True in a process that `accelerate launch` started alone for a multi-process MULTI_CPU config: its simple
    launcher sets MASTER_PORT (num_processes > 1) and ACCELERATE_USE_CPU, but no launcher set a world size."""
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_CPU") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return False
    world = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK")
    alone = "MASTER_PORT" in os.environ and not any(k in os.environ for k in world)
    if alone:
        guard("accelerate_multi_cpu_single_process")
    return alone


@contextlib.contextmanager
def without_hf_deepspeed_config():
    """Inside: transformers sees no DeepSpeed config (no zero.Init in from_config/from_pretrained)."""
    from transformers.integrations import deepspeed as hf_ds

    guard("accelerate_zero3_init_flag_scope")
    saved = _private(hf_ds, "_hf_deepspeed_config_weak_ref", "accelerate_zero3_init_flag_scope")
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def accelerator_dataloaders(accelerator) -> list:
    """The dataloaders accelerator.prepare() registered (the list itself: extend it to put some back)."""
    guard("accelerate_private_dataloaders")
    return _private(accelerator, "_dataloaders", "accelerate_private_dataloaders")


# ----------------------------------------------------------------------------- torch
def set_scheduler_last_lr(scheduler, lrs: list) -> None:
    guard("torch_lambdalr_last_lr")
    _private(scheduler, "_last_lr", "torch_lambdalr_last_lr")
    scheduler._last_lr = lrs


def is_traceable_wrapper_subclass(t) -> bool:
    guard("torch_traceable_wrapper_subclass")
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass as check

    return check(t)


# ----------------------------------------------------------------------------- transformers
def set_gradient_checkpointing_func(block, func) -> None:
    """Make HF's GradientCheckpointingLayer run `block` through func(forward, *args) when checkpointing is on."""
    guard("transformers_checkpointing_func")
    block.gradient_checkpointing = True
    block._gradient_checkpointing_func = func


def set_attn_implementation(config, name: str) -> None:
    guard("transformers_attn_implementation")
    config._attn_implementation = name


def attn_implementation(config) -> str | None:
    """The attention kernel a config asks for (None when it says nothing)."""
    return getattr(config, "_attn_implementation", None)


def hf_init_weights(model):
    """The bound PreTrainedModel._init_weights of `model` (initialises one module, its direct parameters and those of
    its direct children)."""
    guard("transformers_init_weights_by_module")
    return _private(model, "_init_weights", "transformers_init_weights_by_module")


def transformers_optimization():
    """transformers.optimization (get_scheduler, and SchedulerType through its trainer_utils) without the peft import
    that trainer_utils does at module level for Trainer's PEFT helpers: peft imports bitsandbytes, which torch.compiles
    its CPU ops at import, ~1.4 s of every process's start-up (the imports of a GPT-2 run: 6.7-6.9 s with it,
    5.35-5.5 s without, on 2 quiet cores; tests/test_workarounds.py checks that neither is imported). Only
    trainer_utils is imported with transformers' peft check off (it binds the check at import, and Trainer's helpers
    then see no peft model, which dsrecipes does not hand them); modeling_utils and everything else keep the real
    check, and LoRA imports peft itself (dsrecipes.train.lora)."""
    if "transformers.trainer_utils" not in sys.modules:
        guard("transformers_optimization_without_peft")
        import transformers.utils as hf_utils

        real = hf_utils.is_peft_available
        hf_utils.is_peft_available = lambda: False
        try:
            import transformers.optimization  # noqa: F401  (imports trainer_utils with the check off)
        finally:
            hf_utils.is_peft_available = real
    import transformers.optimization

    return transformers.optimization
