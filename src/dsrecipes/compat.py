"""Every workaround for a library bug, and every private attribute of a library that dsrecipes touches, in one place.

    python -m dsrecipes.compat        # each workaround, the version it was written for, the installed one, re-check?

Each workaround names the package and the last version it was verified against (VERIFIED) and its upstream issue
(or "no upstream issue found"). When the installed version is newer, the first use warns once (CompatWarning):
the workaround still runs, and the warning says which issue to re-check so it can be deleted after an upgrade.
A private attribute that disappeared raises a RuntimeError naming the workaround, instead of an AttributeError deep
inside a training step. Importing this module imports no torch (the planner CLI stays light).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

from packaging.version import Version


class CompatWarning(UserWarning):
    """A workaround runs on a newer library than the one it was written for."""


@dataclass(frozen=True)
class Workaround:
    package: str
    verified: str  # the last version of `package` this workaround was checked against
    issue: str  # upstream issue, or "no upstream issue found"
    what: str


WORKAROUNDS: dict[str, Workaround] = {
    "accelerate_cpu_deepspeed_world_size": Workaround(
        "accelerate",
        "1.15.0",
        "no upstream issue found",
        "accelerate leaves num_processes=1 for DeepSpeed on a machine without GPUs (DeepSpeed's cpu accelerator) "
        "although DeepSpeed initialised N ranks: every rank would read the whole dataset, reductions were skipped",
    ),
    "accelerate_multi_cpu_single_process": Workaround(
        "accelerate",
        "1.15.0",
        "no upstream issue found",
        "`accelerate launch` with distributed_type MULTI_CPU and num_processes > 1 but no --mpirun_hostfile runs its "
        "simple launcher: ONE process, which trains alone while the config says N; refused at start-up instead",
    ),
    "accelerate_zero3_init_flag_scope": Workaround(
        "accelerate",
        "1.15.0",
        "no upstream issue found (accelerate #1801 is the opposite case: zero3_init_flag true but no zero.Init)",
        "accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says, so from_config and "
        "from_pretrained would always build under zero.Init; unsetting it touches transformers' private "
        "_hf_deepspeed_config_weak_ref",
    ),
    "transformers_init_weights_by_module": Workaround(
        "transformers",
        "5.23.0",
        "no upstream issue found (transformers has no public per-module init)",
        "from-config models are re-initialised module by module, each from a seed derived from its name, so a "
        "build under zero.Init gives the same weights as an unsharded one; that calls the private "
        "PreTrainedModel._init_weights",
    ),
    "deepspeed_full_optimizer_state": Workaround(
        "deepspeed",
        "0.19.8",
        "no upstream issue found",
        "deepspeed.utils.safe_get_full_optimizer_state fails for parameters outside the first param group (ZeRO "
        "links the per-parameter state views after the first group's step and never re-links); the state is read at "
        "the private _hp_mapping addresses and reduced over the private _dp_group instead",
    ),
    "deepspeed_pipe_zero0_clip_norm": Workaround(
        "deepspeed",
        "0.19.8",
        "no upstream issue found for ZeRO-0 (DeepSpeed PR #7847 reworks the pipeline + ZeRO-1 gradient norm)",
        "under ZeRO-0, deepspeed.runtime.utils.clip_grad_norm_ sums squared norms over the model-parallel group but "
        "counts only model-parallel rank 0's parameters unless they carry model_parallel=True, so every pipeline "
        "stage after the first was left out of the global norm",
    ),
    "deepspeed_pipe_instruction_map": Workaround(
        "deepspeed",
        "0.19.8",
        "no upstream issue found (no public hook around pipeline instructions)",
        "the bubble meter times each pipeline instruction by wrapping the private PipelineEngine._INSTRUCTION_MAP "
        "of one engine instance, and maps ranks to stages through the grid's private _topo",
    ),
    "deepspeed_pipe_frozen_tied_weight": Workaround(
        "deepspeed",
        "0.19.8",
        "no upstream issue found",
        "PipelineEngine all-reduces the gradient of every tied weight (under bf16 it reads lp._hp_grad, which a "
        "frozen weight never gets: AttributeError); a tied group whose weights are all frozen is dropped from "
        "PipelineModule.tied_comms (its copies cannot drift apart: nothing updates them)",
    ),
    "accelerate_private_dataloaders": Workaround(
        "accelerate",
        "1.15.0",
        "no upstream issue found",
        "Accelerator.free_memory() forgets the prepared dataloaders (private _dataloaders), which save_state needs "
        "for their samplers; the engine rebuild after progressive freezing puts them back",
    ),
    "torch_lambdalr_last_lr": Workaround(
        "torch",
        "2.13.0",
        "no upstream issue found (LambdaLR has no public way to jump to an epoch)",
        "a fresh LambdaLR is put at a given epoch by setting last_epoch and the private _last_lr",
    ),
    "torch_traceable_wrapper_subclass": Workaround(
        "torch",
        "2.13.0",
        "no upstream issue found (is_traceable_wrapper_subclass lives in the private torch.utils._python_dispatch)",
        "saved-tensor accounting unwraps tensor subclasses (torchao's quantized tensors) to count their storage",
    ),
    "transformers_checkpointing_func": Workaround(
        "transformers",
        "5.23.0",
        "no upstream issue found (GradientCheckpointingLayer takes only torch.utils.checkpoint through its API)",
        "gradient_checkpointing: deepspeed sets the private _gradient_checkpointing_func of each block so HF's "
        "GradientCheckpointingLayer calls deepspeed.checkpointing.checkpoint",
    ),
    "transformers_attn_implementation": Workaround(
        "transformers",
        "5.23.0",
        "no upstream issue found (a config object has no public setter for the attention kernel)",
        "pipeline layers are built from a config whose private _attn_implementation is set to sdpa (causal "
        "without a mask tensor); the memory planner reads it to pick the attention term",
    ),
    "deepspeed_load_universal_save_time": Workaround(
        "deepspeed",
        "0.19.8",
        "DeepSpeed #7546",
        "with checkpoint.load_universal set while saving, ZeRO-3 writes only rank 0's model states, so every later "
        "checkpoint is broken; an elastic resume sets the engine's private _config.load_universal_checkpoint for its "
        "one load and clears it before anything is saved",
    ),
    "deepspeed_zero3_universal_load_state": Workaround(
        "deepspeed",
        "0.19.8",
        "no upstream issue found for the shared step (DeepSpeed PR #7585: several param_groups in the converter)",
        "ZeRO-3's universal load gives every optimizer sub-group the SAME `step` tensor, which torch's AdamW then "
        "increments once per sub-group (bias correction runs ahead after the resume), and copies param_groups[0]'s "
        "hyperparameters (weight_decay, betas, ...) onto every group; each state gets its own step and each group "
        "its own saved hyperparameters back",
    ),
    "deepspeed_exclude_frozen_tied": Workaround(
        "deepspeed", "0.19.8", "no upstream issue found", "exclude_frozen_parameters keeps frozen tied aliases"
    ),
    "bnb_cpu_packed_4bit": Workaround(
        "bitsandbytes", "0.50.2", "no upstream issue found", "CPU 4-bit eval packing breaks training: disabled"
    ),
}
_warned: set[str] = set()


def _version(package: str) -> Version | None:
    try:
        return Version(installed_version(package))
    except PackageNotFoundError:
        return None


def outdated(name: str) -> bool:
    """True when the installed package is newer than the version the workaround was verified against."""
    w = WORKAROUNDS[name]
    have = _version(w.package)
    return have is not None and Version(have.base_version) > Version(w.verified)


def guard(name: str) -> None:
    """Called by each workaround before it runs: warn once when its library is newer than verified."""
    if name in _warned or not outdated(name):
        return
    _warned.add(name)
    w = WORKAROUNDS[name]
    warnings.warn(
        f"dsrecipes.compat.{name} was written for {w.package} <= {w.verified}, {w.package} "
        f"{_version(w.package)} is installed: re-check ({w.issue}) and delete the workaround if it is fixed",
        CompatWarning,
        stacklevel=3,
    )


def _private(obj, attr: str, name: str):
    if not hasattr(obj, attr):
        w = WORKAROUNDS[name]
        raise RuntimeError(
            f"{type(obj).__name__}.{attr} is gone in {w.package} {_version(w.package)}: dsrecipes.compat.{name} "
            f"(written for {w.package} {w.verified}) needs updating"
        )
    return getattr(obj, attr)


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


@contextlib.contextmanager
def load_universal_for_this_load(engine, universal_engine_dir: str):
    """Inside: the DeepSpeed engine loads universal checkpoints; outside (and at every save): it does not (#7546).
    After a ZeRO-3 load, the optimizer state is repaired (deepspeed_zero3_universal_load_state)."""
    guard("deepspeed_load_universal_save_time")
    config = _private(engine, "_config", "deepspeed_load_universal_save_time")
    _private(config, "load_universal_checkpoint", "deepspeed_load_universal_save_time")
    config.load_universal_checkpoint = True
    try:
        yield
        if engine.zero_optimization_stage() == 3:
            _repair_zero3_universal_state(engine.optimizer.optimizer, universal_engine_dir)
    finally:
        config.load_universal_checkpoint = False


def _repair_zero3_universal_state(optimizer, universal_engine_dir: str) -> None:
    import torch

    guard("deepspeed_zero3_universal_load_state")
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()  # one counter per sub-group, as before the save
    saved = torch.load(os.path.join(universal_engine_dir, "zero", "optimizer_state.pt"), weights_only=False)
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) == len(optimizer.param_groups):
        for group, old in zip(optimizer.param_groups, groups):
            group.update({k: v for k, v in old.items() if k != "params"})


def accelerator_dataloaders(accelerator) -> list:
    """The dataloaders accelerator.prepare() registered (the list itself: extend it to put some back)."""
    guard("accelerate_private_dataloaders")
    return _private(accelerator, "_dataloaders", "accelerate_private_dataloaders")


# ----------------------------------------------------------------------------- DeepSpeed
def zero_full_fp32(p, flat_state, key: str | None):
    """Collective. One parameter's full fp32 tensor (key None: the master weight, else an optimizer state such as
    exp_avg) assembled from the ZeRO 1/2 (or bf16) flat partitions. flat_state(mapping) -> the optimizer state
    dict of the flat partition holding the parameter."""
    import torch
    import torch.distributed as dist

    guard("deepspeed_full_optimizer_state")
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    m = _private(p, "_hp_mapping", "deepspeed_full_optimizer_state")
    if m is not None:
        lo, hi = m.lp_fragment_address, m.hp_fragment_address
        src = m.hp_fragment.flatten() if key is None else flat_state(m)[key].narrow(0, hi.start, hi.numel)
        buf.narrow(0, lo.start, lo.numel).copy_(src)
    dist.all_reduce(buf, group=_private(p, "_dp_group", "deepspeed_full_optimizer_state"))
    return buf.view(p.shape)


def flag_pipeline_params_for_clipping(pipe) -> None:
    """Flag each stage's own parameters model_parallel=True so ZeRO-0 clipping counts every stage once; the second
    copy of a tied weight (ds_pipe_replicated) stays unflagged. ZeRO-1 computes the same global norm either way."""
    guard("deepspeed_pipe_zero0_clip_norm")
    for p in pipe.parameters():
        p.model_parallel = not getattr(p, "ds_pipe_replicated", False)


def drop_frozen_tied_weights(pipe) -> list[str]:
    """Before deepspeed.initialize: stop the tied-gradient all-reduce of tied groups that are entirely frozen.
    -> the keys dropped."""
    guard("deepspeed_pipe_frozen_tied_weight")
    dropped = []
    for key, comm in list(pipe.tied_comms.items()):
        weights = [getattr(comm["module"], attr) for attr in comm["weight_attr"]]
        if weights and not any(w.requires_grad for w in weights):
            del pipe.tied_comms[key]
            dropped.append(key)
    return dropped


def pipe_instruction_table(engine) -> dict:
    """A copy of the PipelineEngine's {instruction class: method} table."""
    guard("deepspeed_pipe_instruction_map")
    return dict(_private(type(engine), "_INSTRUCTION_MAP", "deepspeed_pipe_instruction_map"))


def install_pipe_instruction_table(engine, table: dict) -> None:
    """Use `table` for this engine instance only (the engine looks the table up on self)."""
    engine._INSTRUCTION_MAP = table


def pipe_stage_of_rank(grid, rank: int) -> int:
    """The pipeline stage of a global rank."""
    return _private(grid, "_topo", "deepspeed_pipe_instruction_map").get_coord(rank).pipe


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


# ----------------------------------------------------------------------------- report
def report() -> list[dict]:
    return [
        {
            "workaround": name,
            "package": w.package,
            "verified": w.verified,
            "installed": str(_version(w.package)),
            "recheck": outdated(name),
            "issue": w.issue,
        }
        for name, w in WORKAROUNDS.items()
    ]


if __name__ == "__main__":
    for row in report():
        flag = "RE-CHECK" if row["recheck"] else "ok"
        print(f"{flag:<8} {row['workaround']:<38} {row['package']} {row['verified']} (installed {row['installed']})")
        print(f"         {row['issue']}")


# ----------------------------------------------------------------------------- transformers
def hf_init_weights(model):
    """The bound PreTrainedModel._init_weights of `model` (initialises one module, its direct parameters and those of
    its direct children)."""
    guard("transformers_init_weights_by_module")
    return _private(model, "_init_weights", "transformers_init_weights_by_module")
