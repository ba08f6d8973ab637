"""The DeepSpeed workarounds: universal-checkpoint loading (#7546) and the ZeRO-3 optimizer state it shares, the
full fp32 state of a ZeRO 1/2 parameter, the pipeline engine (ZeRO-0 clipping, frozen tied weights, the instruction
table and the stage topology the bubble meter reads), the gradient scale of the sequence-parallel loss
(#5248, #5555) and the dtype ZeRO-3's Init keeps (#8428's line). Each calls guard() with its entry in
dsrecipes.compat.registry. Imports no torch at import time.
"""

from __future__ import annotations

import contextlib
import os

from dsrecipes.compat.registry import _private, guard


# ----------------------------------------------------------------------------- checkpoints
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


# ----------------------------------------------------------------------------- ZeRO partitions and the pipeline engine
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


# ----------------------------------------------------------------------------- sequence parallelism
def sp_gradient_scale(engine, sp: int) -> float:
    """The factor of the SP loss's backward that makes the engine's gradient the unsplit sequence's. DeepSpeed 0.19
    reduces gradients under SP two ways: ZeRO 0-2 divide the all-reduced sum by world / sp, so the SP ranks'
    gradients add up (DeepSpeed #5248, #5555): 1/sp; ZeRO-3's default reduce-scatter (reduce_scatter_coalesced)
    divides by the world size, so they average: 1. A plain module (no zero_optimization_stage): 1, its caller
    averages the ranks' gradients (tests/sp_worker.py). Measured in tests/test_sequence_parallel_cells.py: without
    the scale, ZeRO 0-2 at sp=2 gave twice the sp=1 gradient (AdamW's update hides the factor; the gradient norm,
    clipping and Adam's eps do not). ZeRO-3 with reduce_scatter: false does both, bucket by bucket, so no scale is
    right: the rule table refuses it before training (config/rules_sp.py, sp_zero3_reduce_scatter_off)."""
    stage = getattr(engine, "zero_optimization_stage", None)
    if sp <= 1 or stage is None:
        return 1.0
    guard("deepspeed_sp_gradient_sum")
    return 1.0 / sp if stage() < 3 else 1.0


# ----------------------------------------------------------------------------- ZeRO-3 partitioning
def keep_zero3_init_dtype() -> None:
    """Make zero.Init keep a dtype it is given. DeepSpeed 0.19.8's Init._set_dtype reads
    `dtype or fp16 if is_fp16_supported() else bf16 if is_bf16_supported else fp32`, which Python groups as
    `(dtype or fp16) if ... else (...)`: where the accelerator has no fp16 (DeepSpeed's cpu accelerator on a CPU
    without AVX512-FP16/AMX-FP16, where is_fp16_supported() returns None) the dtype is dropped, and the missing `()`
    (DeepSpeed PR #8428) makes it bfloat16. The engine builds Init with the model's dtype, so an fp32 ZeRO-3 run's
    NVMe parameter swapper got bfloat16 buffers (swap folder zero_stage_3/bfloat16params) on such CPUs and fp32
    ones on others. Patched once per process: an explicit dtype is kept (what every GPU accelerator already gets);
    without one, the config decides as before. A no-op outside a DeepSpeed launch (no deepspeed import)."""
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return
    from deepspeed.runtime.zero import partition_parameters as pp

    if getattr(pp.Init._set_dtype, "_dsrecipes", False):
        return
    guard("deepspeed_zero3_init_dtype")
    original = pp.Init._set_dtype

    def _set_dtype(self, ds_config, dtype):
        original(self, ds_config, dtype)
        if dtype is not None:
            self.dtype = dtype

    _set_dtype._dsrecipes = True
    pp.Init._set_dtype = _set_dtype
