"""The registry of library workarounds: what each one is, the version it was verified on, and the guards.

    python -m dsrecipes.compat        # each workaround, the version it was written for, the installed one, re-check?

Holds Workaround, WORKAROUNDS (every entry: package, the last version it was verified against, its upstream issue or
"no upstream issue found", what it does), guard(name) (called by each workaround before it runs: warns once,
CompatWarning, when the installed package is newer than verified, naming the issue to re-check), outdated(name),
_version(package) (the installed version, read from the package metadata once per process), _private(obj, attr,
name) (a private attribute, or a RuntimeError naming the workaround when it is gone) and report(). The workarounds
themselves live by library in dsrecipes.compat.deepspeed and dsrecipes.compat.hf. Imports no torch.
"""

from __future__ import annotations

import functools
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
    "transformers_optimization_without_peft": Workaround(
        "transformers",
        "5.23.0",
        "no upstream issue found (trainer_utils imports peft at module level for Trainer's helpers)",
        "get_scheduler and SchedulerType live in transformers.optimization, whose trainer_utils imports peft, and "
        "peft imports bitsandbytes, which torch.compiles its CPU ops at import: ~1.4 s per process of a run that "
        "uses no LoRA; imported with transformers' peft check off for that import only (LoRA imports peft itself)",
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
    "deepspeed_sp_gradient_sum": Workaround(
        "deepspeed",
        "0.19.8",
        "DeepSpeed #5248, #5555",
        "under sequence parallelism ZeRO 0-2 divide the all-reduced gradient sum by world / sp, so the SP ranks' "
        "gradients add up (sp x the unsplit gradient), while ZeRO-3's reduce-scatter divides by the world size "
        "(they average); the SP loss takes 1/sp of its backward under ZeRO 0-2 (compat.sp_gradient_scale)",
    ),
    "deepspeed_zero3_init_dtype": Workaround(
        "deepspeed",
        "0.19.8",
        "DeepSpeed PR #8428 (the same line; the grouping that drops an explicit dtype: no upstream issue found)",
        "zero.Init drops the dtype it is given where the accelerator lacks fp16 (the cpu accelerator on most CPUs) "
        "and picks bfloat16: an fp32 ZeRO-3 run swapped its parameters to NVMe through bfloat16 buffers; the "
        "given dtype is kept (compat.keep_zero3_init_dtype)",
    ),
    "bnb_cpu_packed_4bit": Workaround(
        "bitsandbytes", "0.50.2", "no upstream issue found", "CPU 4-bit eval packing breaks training: disabled"
    ),
}
_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def _version(package: str) -> Version | None:
    """The installed version of `package` (None: not installed). Cached per process: guard() runs on every call of
    a workaround (measure.model_state_bytes: ~830 times in a 2-step run), and a metadata lookup reads the disk."""
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
