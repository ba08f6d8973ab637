"""Memory planner: per-GPU training memory before renting the GPUs, and which setup makes a run fit.

    dsrecipes plan --model configs/models/gpt2_small.json --zero 2 --gpus 8 --micro-batch 8 --seq-len 1024 \
        --gpu A100-40GB
    dsrecipes plan --layers 32 --hidden 4096 --heads 32 --params 7e9 --fit --gpu A100-80GB --gpus 8 --json
    plan = plan_memory(load_model_spec("configs/models/tiny_gpt2.json", vocab=257), zero_stage=2, gpus_per_node=2)

`dsrecipes plan` (dsrecipes.memory.planner_cli) prints the per-rank breakdown in bytes (parameters, gradients,
optimizer states, activations, buffers, total, plus what offload puts in CPU memory) and whether it fits a GPU of
dsrecipes.memory.gpus.GPUS; --json prints the same dict; --fit searches ZeRO stage x offload x checkpointing x
optimizer and ranks what fits by a step-time model (gpus.COST). Model specs: dsrecipes.memory.model_spec.
Model states follow the ZeRO paper (Rajbhandari et al. 2020); activations follow Korthikanti et al. 2022, term by
term as HF GPT-2 and HF Llama/Qwen2 save them (dsrecipes.memory.activations, calibrated with saved-tensor hooks);
sp (Ulysses), tp (AutoTP) and the ALST tiling: dsrecipes.memory.planner_parallel. Derivations, calibration, the cost
model and where DeepSpeed's own estimators differ: docs/planner.md.
"""

from __future__ import annotations

import math

from dsrecipes.memory.activations import activation_bytes  # noqa: F401 (re-exported)
from dsrecipes.memory.gpus import COST, DEFAULT_HEADROOM, GPUS, GiB, fits, gpu_memory, step_cost  # noqa: F401 (re-exported)
from dsrecipes.memory.model_spec import (  # noqa: F401 (re-exported: the planner's API takes and makes specs)
    ModelSpec,
    _bad,
    _positive,
    load_model_spec,
    spec_from_config,
)
from dsrecipes.memory.planner_parallel import check_parallel, fit_search, tp_fraction  # noqa: F401 (re-exported)

# Optimizer state bytes per trainable parameter, master weights excluded: (quantized bytes, block size, min numel).
# 8/4-bit: two states, one fp32 scale per block per state; smaller tensors keep fp32 states (8 B).
# See dsrecipes.train.optimizers.
# builds bitsandbytes with min_8bit_size=0; torchao quantizes tensors of >= 4096 values divisible by the block.
OPTIMIZERS = {
    "adamw": (8, 0, 0),
    "adam": (8, 0, 0),
    "sgd": (4, 0, 0),
    "adamw_8bit": (2, 256, 0),
    "paged_adamw_8bit": (2, 256, 0),
    "torchao_adamw_8bit": (2, 256, 4096),
    "torchao_adamw_4bit": (1, 128, 4096),
}
LOW_BIT = {"adamw_8bit", "paged_adamw_8bit", "torchao_adamw_8bit", "torchao_adamw_4bit"}
CHECKPOINTING = ("none", "full", "every_k", "layer_selective", "deepspeed")


def _state_bytes_per_param(spec, optimizer):
    """Average optimizer-state bytes per parameter (master weights excluded), from the tensor sizes."""
    qbytes, block, min_numel = OPTIMIZERS[optimizer]
    if not block:
        return float(qbytes)
    total = sum(
        n * qbytes + 2 * 4 * math.ceil(n / block) if n >= min_numel and (not min_numel or n % block == 0) else 8 * n
        for n in spec.numels
    )
    return total / sum(spec.numels)


def plan_memory(
    spec,
    *,
    zero_stage=0,
    offload_optimizer=False,
    offload_param=False,
    gpus_per_node=1,
    nodes=1,
    micro_batch=1,
    seq_len=None,
    precision="bf16",
    checkpointing="none",
    every_k=None,
    optimizer="adamw",
    frozen_fraction=0.0,
    pipeline_stages=1,
    device="cuda",
    attention=None,
    reduce_bucket_size=None,
    prefetch_bucket_size=None,
    gpu=None,
    headroom=DEFAULT_HEADROOM,
    sp=1,
    tp=1,
    tiled_mlp=False,
    tiled_loss=False,
):
    """Per-rank bytes of one training configuration (the worst rank: pipeline stage 0 or the last stage).
    sp: Ulysses sequence-parallel degree (each rank holds seq_len / sp tokens; ZeRO still shards over every rank);
    tp: AutoTP degree (block Linear layers sharded; ZeRO shards over world / tp); tiled_mlp / tiled_loss: ALST."""
    seq_len = seq_len or min(spec.positions or 1024, 1024)
    for key, value in (
        ("gpus_per_node", gpus_per_node),
        ("nodes", nodes),
        ("micro_batch", micro_batch),
        ("seq_len", seq_len),
        ("pipeline_stages", pipeline_stages),
        ("sp", sp),
        ("tp", tp),
    ):
        if not isinstance(value, int) or value <= 0:
            raise _bad(key, f"{value!r} must be a positive integer", f"give {key} >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise _bad("zero_stage", f"{zero_stage!r} is not a ZeRO stage", "use 0, 1, 2 or 3")
    if precision not in ("fp32", "bf16", "fp16"):
        raise _bad("precision", f"unknown precision {precision!r}", "use fp32, bf16 or fp16")
    if optimizer not in OPTIMIZERS:
        raise _bad("optimizer", f"unknown optimizer {optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
    if checkpointing not in CHECKPOINTING:
        raise _bad("checkpointing", f"unknown mode {checkpointing!r}", f"use one of {', '.join(CHECKPOINTING)}")
    if not isinstance(frozen_fraction, (int, float)) or not 0 <= frozen_fraction < 1:
        raise _bad("frozen_fraction", f"{frozen_fraction!r} is not in [0, 1)", "give the fraction of frozen parameters")
    if device not in ("cuda", "cpu"):
        raise _bad("device", f"unknown device {device!r}", "use cuda or cpu")
    if offload_param and zero_stage != 3:
        raise _bad("offload_param", "parameter offload needs ZeRO stage 3", "use --zero 3 or drop --offload-param")
    if offload_optimizer and zero_stage == 0:
        raise _bad("offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3", "use --zero 1, 2 or 3")
    if optimizer in LOW_BIT and (offload_optimizer or zero_stage == 3):
        raise _bad(
            "optimizer",
            f"{optimizer} cannot run {'offloaded' if offload_optimizer else 'under ZeRO-3'} (see dsrecipes check)",
            "use adamw, or ZeRO 0-2 without offload",
        )
    if pipeline_stages > 1 and zero_stage > 1:
        raise _bad("zero_stage", "DeepSpeed's pipeline engine supports only ZeRO 0 and 1", "use --zero 0 or 1")
    world = gpus_per_node * nodes
    if world % pipeline_stages:
        raise _bad("pipeline_stages", f"{world} GPUs do not split into {pipeline_stages} stages", "give a divisor")
    check_parallel(spec, world, zero_stage, pipeline_stages, seq_len, sp, tp)
    if spec.positions and seq_len > spec.positions:
        raise _bad("seq_len", f"{seq_len} exceeds the model's {spec.positions} positions", "give a shorter --seq-len")
    k = every_k or max(1, round(math.sqrt(spec.layers)))
    if not isinstance(k, int) or k <= 0:
        raise _bad("every_k", f"{every_k!r} must be a positive integer", "give --every-k >= 1")
    p, nd = pipeline_stages, world // pipeline_stages // tp

    # ---- model states (ZeRO paper; Psi = params on this pipeline stage and TP rank, Psi_t = its trainable part)
    psi = spec.params * tp_fraction(spec, tp) / p
    psi_t = psi * (1 - frozen_fraction)
    pb = 4 if precision == "fp32" else 2  # model params and grads: fp32, or the 16-bit copies of mixed precision
    # fp32 master weights: mixed precision always (the paper's K = 12 = 4 + 8 for Adam); in fp32 only under ZeRO >= 1,
    # where DeepSpeed clones the rank's partition for the optimizer (measured, docs/planner.md).
    master = 4 if precision != "fp32" or zero_stage >= 1 else 0
    states = _state_bytes_per_param(spec, optimizer)
    shard = nd if zero_stage >= 1 else 1
    persist = sum(n for n in spec.numels if n < 10 * spec.hidden) / p if zero_stage == 3 else 0  # not partitioned
    params = 0 if offload_param else ((psi - persist) / nd + persist if zero_stage == 3 else psi) * pb
    grads = psi_t * pb / (nd if zero_stage >= 2 else 1)
    opt = psi_t * (master + states) / shard
    cpu = 0.0
    if offload_optimizer:  # ZeRO-Offload: master + states (and for stage >= 2 the fp32 gradient partition) on CPU
        cpu += opt + (psi_t * 4 / nd if zero_stage >= 2 else 0)
        opt, grads = 0.0, (grads if zero_stage == 1 else 0.0)
    if offload_param:
        cpu += (psi - persist) / nd * pb + persist * pb

    # ---- activations (one micro-batch; 1F1B keeps up to p micro-batches in flight on the first stage)
    act = activation_bytes(
        spec,
        micro_batch,
        seq_len,
        precision,
        device,
        attention,
        sp=sp,
        tp=tp,
        tiled_mlp=tiled_mlp,
        tiled_loss=tiled_loss,
    )
    layers = math.ceil(spec.layers / p)
    if checkpointing == "none":
        per_layer, recompute = act["layer"] * layers + act["rope"], 0
    elif checkpointing == "every_k":  # keep the input of each k-block segment; backward recomputes one segment
        per_layer, recompute = act["block_input"] * math.ceil(layers / k), act["layer"] * min(k, layers)
    elif checkpointing == "layer_selective":  # blocks 0, k, 2k, ... keep their input, the others everything
        ks = every_k or 2
        picked = math.ceil(layers / ks)
        per_layer = act["block_input"] * picked + act["layer"] * (layers - picked)
        per_layer += act["rope"] if picked < layers else 0
        # a checkpointed block is recomputed after the blocks behind it have freed theirs, so the recompute adds to
        # the peak only when the last block is checkpointed (backward recomputes it first, with everything held)
        recompute = act["layer"] if (layers - 1) % ks == 0 else 0
    else:  # full / deepspeed: every block's input; backward recomputes one block at a time
        per_layer, recompute = act["block_input"] * layers, act["layer"]
    first = p * (per_layer + act["embed"]) + (act["head"] if p == 1 else 0)
    last = per_layer + act["head"] if p > 1 else first
    saved = max(first, last)
    recompute += act["mlp_recompute"]  # a tiled MLP recomputes one tile at a time in backward
    activations = saved + recompute

    # ---- buffers: ZeRO communication buckets, ZeRO-3's gathered layer + prefetch, the logits and their gradient
    rb = reduce_bucket_size if reduce_bucket_size is not None else spec.hidden**2  # accelerate's "auto"
    pf = prefetch_bucket_size if prefetch_bucket_size is not None else int(0.9 * spec.hidden**2)
    buckets = {0: 0, 1: min(rb, psi_t) * pb, 2: rb * pb, 3: rb * pb + spec.largest_layer * 2 * pb + pf * pb}[zero_stage]
    logits = act["logits_transient"] if p == 1 or last >= first else 0
    buffers = buckets + logits + act["sp_all_to_all"]

    total = params + grads + opt + activations + buffers
    out = {
        "parameters": int(params),
        "gradients": int(grads),
        "optimizer_states": int(opt),
        "activations": int(activations),
        "buffers": int(buffers),
        "total": int(total),
        "cpu_offload_per_node": int(cpu * gpus_per_node),
        "detail": {
            "params_total": spec.params,
            "trainable_per_rank": int(psi_t),
            "data_parallel": nd,
            "master_weights": int(psi_t * master / shard) if not offload_optimizer else 0,
            "optimizer_state_bytes_per_param": round(states, 4),
            "activations_saved_forward": int(saved),
            "activations_recompute": int(recompute),
            "activation_per_layer": act["layer"],
            "activation_embed": act["embed"],
            "activation_head": act["head"],
            "buckets": int(buckets),
            "logits_transient": int(logits),
            "sp_all_to_all": int(act["sp_all_to_all"]),
            "mlp_recompute": int(act["mlp_recompute"]),
            "tokens_per_rank": math.ceil(seq_len / sp) * micro_batch,
            "tp_sharded_fraction": round(tp_fraction(spec, 1, sharded_only=True), 4),
            "mlp_shards": act["mlp_shards"],
            "loss_shards": act["loss_shards"],
            "every_k": k
            if checkpointing == "every_k"
            else ((every_k or 2) if checkpointing == "layer_selective" else None),
        },
        "inputs": {
            "model": spec.name,
            "params": spec.params,
            "layers": spec.layers,
            "hidden": spec.hidden,
            "heads": spec.heads,
            "vocab": spec.vocab,
            "exact_param_count": spec.exact,
            "zero_stage": zero_stage,
            "offload_optimizer": offload_optimizer,
            "offload_param": offload_param,
            "gpus_per_node": gpus_per_node,
            "nodes": nodes,
            "micro_batch": micro_batch,
            "seq_len": seq_len,
            "precision": precision,
            "checkpointing": checkpointing,
            "optimizer": optimizer,
            "frozen_fraction": frozen_fraction,
            "pipeline_stages": p,
            "device": device,
            "attention": attention or spec.attention,
            "family": spec.family,
            "kv_heads": spec.kv_heads,
            "sp": sp,
            "tp": tp,
            "tiled_mlp": tiled_mlp,
            "tiled_loss": tiled_loss,
        },
    }
    out["fit"] = fits(out["total"], gpu, headroom) if gpu else None
    return out


def deepspeed_estimate(
    spec,
    zero_stage,
    gpus_per_node=1,
    nodes=1,
    offload_optimizer=False,
    offload_param=False,
    additional_buffer_factor=1.5,
):
    """DeepSpeed's own model-state estimate (the numbers its estimate_zero{2,3}_..._all_cold print), or None for
    stages 0/1, which it has no estimator for. Returns bytes per GPU and per CPU (node)."""
    if zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as est2

        cpu, gpu = est2(
            spec.params,
            gpus_per_node,
            nodes,
            cpu_offload=offload_optimizer,
            additional_buffer_factor=additional_buffer_factor,
        )
        return {"gpu": gpu, "cpu": cpu}
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as est3

        cpu, gpu, _ = est3(
            spec.params,
            spec.largest_layer,
            gpus_per_node,
            nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param,
            zero_init=True,
            additional_buffer_factor=additional_buffer_factor,
        )
        return {"gpu": gpu, "cpu": cpu}
    return None
