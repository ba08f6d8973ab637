"""The memory planner's sequence- and tensor-parallel side: which sp/tp a model and setup allow, the share of
parameters AutoTP shards, and --fit's search over ZeRO x offload x checkpointing x optimizer x sp x tp x tiling.

    check_parallel(spec, world=8, zero_stage=2, pipeline_stages=1, seq_len=4096, sp=2, tp=1)   # ConfigError or None
    tp_fraction(spec, tp=2)          # parameters per TP rank / all parameters
    rows = fit_search(spec, "A100-80GB", gpus_per_node=8, seq_len=32768)
Used by dsrecipes.memory.planner (plan_memory, fit_search re-exported there); docs/planner.md.
"""

from __future__ import annotations

from dsrecipes.memory.gpus import DEFAULT_HEADROOM, gpu_memory, step_cost
from dsrecipes.memory.model_spec import _bad


def check_parallel(spec, world, zero_stage, pipeline_stages, seq_len, sp, tp):
    """One-line ConfigError for an sp/tp that DeepSpeed (Ulysses, AutoTP) or the planner does not take."""
    if sp == 1 and tp == 1:
        return
    if sp > 1 and tp > 1:
        raise _bad("tp", "the planner does not model Ulysses sp and AutoTP together", "give --sp or --tp, not both")
    if pipeline_stages > 1:
        raise _bad("pipeline_stages", "sp/tp with pipeline stages is not modelled", "use --pipeline-stages 1")
    n, key = (sp, "sp") if sp > 1 else (tp, "tp")
    if world % n:
        raise _bad(key, f"{world} GPUs do not split into groups of {n}", f"give a --{key} that divides the GPUs")
    if spec.heads % n:
        raise _bad(key, f"{spec.heads} attention heads do not split over {n} ranks", f"give a --{key} dividing heads")
    if sp > 1:
        if spec.family != "llama":  # as dsrecipes.parallel.sequence refuses it: Ulysses needs RoPE position ids
            raise _bad("sp", f"{spec.name} is not a Llama-family model (RoPE)", "use --tp, or a Llama/Qwen2 model")
        if spec.kv_heads % sp and sp % spec.kv_heads:  # Ulysses replicates KV heads only by a whole factor
            raise _bad("sp", f"{spec.kv_heads} KV heads neither divide nor split over sp={sp}", "give a --sp that does")
        if seq_len % sp:
            raise _bad("sp", f"seq_len {seq_len} does not split into {sp} equal shards", "give a multiple of --sp")
        if zero_stage == 0:
            raise _bad("zero_stage", "Ulysses sp crashes under ZeRO stage 0 (DeepSpeed #7833)", "use --zero 1, 2 or 3")
    if tp > 1:
        if spec.kv_heads % tp:
            raise _bad("tp", f"{spec.kv_heads} KV heads do not split over tp={tp}", "give a --tp dividing KV heads")
        if zero_stage == 3:
            raise _bad("zero_stage", "AutoTP training is supported with ZeRO 0-2 only", "use --zero 1 or 2")


def tp_fraction(spec, tp, sharded_only=False):
    """Parameters one TP rank holds / all parameters (block Linear layers split tp ways; embeddings, norms, the
    head and row-parallel biases whole). sharded_only: the fraction AutoTP shards."""
    total = sum(spec.numels) or 1
    shard = sum(n for n, s in zip(spec.numels, spec.sharded) if s) / total
    return shard if sharded_only else 1 - shard + shard / tp


def _degrees(spec, world, seq_len, family_ok, limit):
    return [
        n
        for n in (1, 2, 4, 8)
        if n <= min(world, limit) and not world % n and not spec.heads % n and family_ok(n, seq_len)
    ]


def fit_search(
    spec,
    gpu,
    headroom=DEFAULT_HEADROOM,
    optimizers=("adamw", "adamw_8bit", "torchao_adamw_4bit"),
    max_sp=1,
    max_tp=1,
    **kw,
):
    """Every ZeRO stage x offload x checkpointing x optimizer x sp x tp x tiling that fits `gpu`, fastest (by
    gpus.step_cost), then smallest, first. sp (Llama family only: RoPE) and tp run over 1, 2, 4, 8 up to max_sp /
    max_tp where the GPUs per node and the heads divide (`dsrecipes plan --fit` searches up to the GPUs per node);
    tiling (tiled MLP + tiled loss) only with sp > 1, as ALST uses it."""
    from dsrecipes.config.errors import ConfigError
    from dsrecipes.memory.planner import LOW_BIT, plan_memory

    gpu_memory(gpu)
    world = kw.get("gpus_per_node", 1)  # sp and tp groups stay inside a node
    seq = kw.get("seq_len") or min(spec.positions or 1024, 1024)
    pipelined = kw.get("pipeline_stages", 1) > 1
    sps = [1] if pipelined or spec.family != "llama" else _degrees(spec, world, seq, lambda n, s: not s % n, max_sp)
    tps = [1] if pipelined else _degrees(spec, world, seq, lambda n, s: not spec.kv_heads % n, max_tp)
    parallel = [(s, 1, t) for s in sps for t in ((False, True) if s > 1 else (False,))]
    parallel += [(1, t, False) for t in tps[1:]]
    rows = []
    for stage in (0, 1, 2, 3) if not pipelined else (0, 1):
        offloads = [(False, False)] + ([(True, False)] if stage else []) + ([(True, True)] if stage == 3 else [])
        for off_opt, off_par in offloads:
            for ckpt in ("none", "every_k", "full"):
                for opt in optimizers:
                    if opt in LOW_BIT and (off_opt or stage == 3):
                        continue
                    for sp, tp, tiled in parallel:
                        try:
                            plan = plan_memory(
                                spec,
                                zero_stage=stage,
                                offload_optimizer=off_opt,
                                offload_param=off_par,
                                checkpointing=ckpt,
                                optimizer=opt,
                                gpu=gpu,
                                headroom=headroom,
                                sp=sp,
                                tp=tp,
                                tiled_mlp=tiled,
                                tiled_loss=tiled,
                                **kw,
                            )
                        except ConfigError:  # a combination DeepSpeed refuses (sp under ZeRO-0, tp under ZeRO-3)
                            continue
                        if plan["fit"]["fits"]:
                            rows.append(
                                {
                                    "zero_stage": stage,
                                    "offload_optimizer": off_opt,
                                    "offload_param": off_par,
                                    "checkpointing": ckpt,
                                    "optimizer": opt,
                                    "sp": sp,
                                    "tp": tp,
                                    "tiled": tiled,
                                    "total": plan["total"],
                                    "cpu_offload_per_node": plan["cpu_offload_per_node"],
                                    "relative_step_time": step_cost(
                                        stage, off_opt, off_par, ckpt, opt, sp=sp, tp=tp, tiled_mlp=tiled
                                    ),
                                }
                            )
    return sorted(rows, key=lambda r: (r["relative_step_time"], r["total"]))
