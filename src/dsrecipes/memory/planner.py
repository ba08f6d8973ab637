"""Memory planner: per-GPU training memory before renting the GPUs, and which setup makes a run fit.

    dsrecipes plan --model configs/models/gpt2_small.json --zero 2 --gpus 8 --micro-batch 8 --seq-len 1024 \
        --gpu A100-40GB
    dsrecipes plan --layers 32 --hidden 4096 --heads 32 --params 7e9 --fit --gpu A100-80GB --gpus 8 --json
    plan = plan_memory(load_model_spec("configs/models/tiny_gpt2.json", vocab=257), zero_stage=2, gpus_per_node=2)

Prints the per-rank breakdown in bytes (parameters, gradients, optimizer states, activations, buffers, total, plus
what offload puts in CPU memory) and whether it fits a GPU of dsrecipes.memory.gpus.GPUS; --json prints the same dict;
--fit searches ZeRO stage x offload x checkpointing x optimizer and ranks what fits by a step-time model (gpus.COST).
Model states follow the ZeRO paper (Rajbhandari et al. 2020); activations follow Korthikanti et al. 2022, term by
term as HF GPT-2 saves them (calibrated with saved-tensor hooks). Derivations, calibration, the cost model and where
DeepSpeed's own estimators differ: docs/planner.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from dsrecipes.config.errors import ConfigError
from dsrecipes.memory.gpus import COST, DEFAULT_HEADROOM, GPUS, GiB, fits, gpu_memory, step_cost  # noqa: F401 (re-exported)

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
CHECKPOINTING = ("none", "full", "every_k", "deepspeed")


@dataclasses.dataclass
class ModelSpec:
    """What the planner needs to know about a model; numels (one per parameter tensor) make 8/4-bit and ZeRO-3
    persistence exact when the model could be built on the meta device."""

    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    ffn: int
    positions: int | None = None
    activation: str = "gelu_new"
    attn_dropout: bool = True
    resid_dropout: bool = True
    embd_dropout: bool = True
    attention: str = "sdpa"
    largest_layer: int = 0
    numels: tuple = ()
    exact: bool = False


def _bad(key, problem, fix, where="<cli>"):
    return ConfigError(where, key, problem, fix)


def _positive(key, value, allow_zero=False):
    if value is None or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise _bad(key, f"{value!r} must be a {'non-negative' if allow_zero else 'positive'} number", f"give {key} > 0")
    return value


def _gpt2_numels(layers, hidden, ffn, vocab, positions):
    h, f = hidden, ffn
    block = (h, h, 3 * h * h, 3 * h, h * h, h, h, h, h * f, f, f * h, h)
    return (vocab * h, (positions or 1024) * h) + block * layers + (h, h)


def load_model_spec(source=None, *, params=None, layers=None, hidden=None, heads=None, vocab=None, ffn=None):
    """A ModelSpec from a config.json file, a local model directory, a hub name, or explicit shape numbers."""
    if source is None:
        for key, value in (("--layers", layers), ("--hidden", hidden), ("--heads", heads)):
            _positive(key, value)
        vocab = int(_positive("--vocab", vocab if vocab is not None else 50257))
        ffn = int(_positive("--ffn", ffn if ffn is not None else 4 * hidden))
        if hidden % heads:
            raise _bad("--heads", f"hidden {hidden} is not divisible by {heads} heads", "give a divisor of --hidden")
        numels = _gpt2_numels(int(layers), int(hidden), ffn, vocab, None)
        count = int(_positive("--params", params)) if params is not None else sum(numels)
        return ModelSpec(
            "explicit",
            count,
            int(layers),
            int(hidden),
            int(heads),
            vocab,
            ffn,
            None,
            largest_layer=max(numels),
            numels=numels,
            exact=params is None,
        )
    return spec_from_config(_load_config(source), source, vocab)


def _load_config(source):
    from transformers import AutoConfig

    from dsrecipes.train.models import load_model_config

    if os.path.isfile(source):
        return load_model_config(source)
    if source.endswith(".json") or source.startswith((".", "/", "~")) and not os.path.isdir(source):
        raise _bad("--model", f"file not found: {source!r}", "give a config.json file, a model directory or a hub name")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - offline hub, bad directory, unknown name: all one-line errors
        fix = (
            "the directory needs a config.json"
            if os.path.isdir(source)
            else "give a config.json file or a local model directory (the hub needs a network and HF_HUB_OFFLINE=0)"
        )
        raise _bad(
            "--model",
            f"cannot read a model config from {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})",
            fix,
        ) from None


def spec_from_config(config, name, vocab):
    def first(*keys, default=None):
        return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)

    if vocab is not None:
        config.vocab_size = int(_positive("--vocab", vocab))
    hidden, layers, heads = (
        first("hidden_size", "n_embd"),
        first("num_hidden_layers", "n_layer"),
        first("num_attention_heads", "n_head"),
    )
    if not (hidden and layers and heads):
        raise _bad(
            "--model",
            f"{name}: no hidden size / layer count / head count in the config",
            "use a transformer config (GPT-2, Llama, BERT ...) or give --layers --hidden --heads",
        )
    ffn = first("n_inner", "intermediate_size", "ffn_dim", default=4 * hidden)
    spec = ModelSpec(
        name,
        0,
        layers,
        hidden,
        heads,
        config.vocab_size,
        ffn,
        first("n_positions", "max_position_embeddings"),
        activation=first("activation_function", "hidden_act", default="gelu"),
        attn_dropout=first("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob", default=0) > 0,
        resid_dropout=first("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", default=0) > 0,
        embd_dropout=first("embd_pdrop", "hidden_dropout", "hidden_dropout_prob", default=0) > 0,
        attention=getattr(config, "_attn_implementation", None) or "sdpa",
    )
    try:  # exact count: build the model on the meta device (no memory, no weights)
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
        spec.numels = tuple(p.numel() for p in model.parameters())  # shared (tied) weights once
        spec.largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        spec.exact = True
    except Exception:  # noqa: BLE001 - unknown architecture: GPT-2-shaped estimate, flagged exact=False
        spec.numels = _gpt2_numels(layers, hidden, ffn, config.vocab_size, spec.positions)
        spec.largest_layer = max(spec.numels)
    spec.params = sum(spec.numels)
    return spec


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


def activation_bytes(spec, micro_batch, seq_len, precision="bf16", device="cuda", attention=None):
    """Bytes saved for backward by one micro-batch: per transformer block, embeddings, and the final norm/LM head/loss.

    Korthikanti et al. (16-bit, 1-byte dropout masks) give 34sbh + 5as^2b per block; with e-byte activations this is
    the general form below. Each term is what HF GPT-2 saves (checked with saved-tensor hooks, tests/test_planner.py).
    """
    s, b, h, a, f, V = seq_len, micro_batch, spec.hidden, spec.heads, spec.ffn, spec.vocab
    e = 4 if precision == "fp32" else 2
    sbh, cpu = s * b * h, device == "cpu"
    m = e if cpu else 1  # dropout keeps a mask: on CPU a scaled float mask of the input dtype, on CUDA a bool mask
    g = 4 if spec.activation == "gelu_new" else 1  # HF's gelu_new is Python (pow, tanh, 2 muls): 4 saved tensors
    layer = 5 * e * sbh  # inputs of ln_1, c_attn, c_proj, ln_2, c_fc
    layer += (1 + g) * e * s * b * f  # GELU saves + input of the second MLP matmul
    layer += 2 * 2 * e * s * b  # mean and rstd of both layer norms
    layer += 2 * m * sbh if spec.resid_dropout else 0
    attention = attention or spec.attention
    if attention == "eager" or (cpu and spec.attn_dropout):  # unfused attention ("math" path)
        ce = 4 if cpu and attention != "eager" else e  # CPU sdpa's math path upcasts to fp32
        layer += 3 * ce * sbh  # q, k, v copies for the two batched matmuls
        layer += a * s * s * b * (ce + ((ce if cpu else 1) + ce if spec.attn_dropout else 0))  # softmax, mask, dropped
    else:  # fused kernel: q/k/v (CPU flash also keeps contiguous k, v copies) + fp32 logsumexp; output = c_proj input
        layer += (5 if cpu else 3) * e * sbh + 4 * a * s * b
    embed = 8 * s * b + 8 * s + (m * sbh if spec.embd_dropout else 0)  # token ids, position ids, dropout mask
    head = 2 * e * sbh + 2 * e * s * b + 4 * s * b * V + 8 * s * b + 4  # ln_f in + stats, lm_head in, fp32 log-softmax
    return {
        "layer": layer,
        "embed": embed,
        "head": head,
        "block_input": e * sbh,
        "logits_transient": (e + 4) * s * b * V,
    }


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
):
    """Per-rank bytes of one training configuration (the worst rank: pipeline stage 0 or the last stage)."""
    seq_len = seq_len or min(spec.positions or 1024, 1024)
    for key, value in (
        ("gpus_per_node", gpus_per_node),
        ("nodes", nodes),
        ("micro_batch", micro_batch),
        ("seq_len", seq_len),
        ("pipeline_stages", pipeline_stages),
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
    if spec.positions and seq_len > spec.positions:
        raise _bad("seq_len", f"{seq_len} exceeds the model's {spec.positions} positions", "give a shorter --seq-len")
    k = every_k or max(1, round(math.sqrt(spec.layers)))
    if not isinstance(k, int) or k <= 0:
        raise _bad("every_k", f"{every_k!r} must be a positive integer", "give --every-k >= 1")
    p, nd = pipeline_stages, world // pipeline_stages

    # ---- model states (ZeRO paper; Psi = params on this pipeline stage, Psi_t = its trainable part)
    psi = spec.params / p
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
    act = activation_bytes(spec, micro_batch, seq_len, precision, device, attention)
    layers = math.ceil(spec.layers / p)
    if checkpointing == "none":
        per_layer, recompute = act["layer"] * layers, 0
    elif checkpointing == "every_k":  # keep the input of each k-block segment; backward recomputes one segment
        per_layer, recompute = act["block_input"] * math.ceil(layers / k), act["layer"] * min(k, layers)
    else:  # full / deepspeed: every block's input; backward recomputes one block at a time
        per_layer, recompute = act["block_input"] * layers, act["layer"]
    first = p * (per_layer + act["embed"]) + (act["head"] if p == 1 else 0)
    last = per_layer + act["head"] if p > 1 else first
    saved = max(first, last)
    activations = saved + recompute

    # ---- buffers: ZeRO communication buckets, ZeRO-3's gathered layer + prefetch, the logits and their gradient
    rb = reduce_bucket_size if reduce_bucket_size is not None else spec.hidden**2  # accelerate's "auto"
    pf = prefetch_bucket_size if prefetch_bucket_size is not None else int(0.9 * spec.hidden**2)
    buckets = {0: 0, 1: min(rb, psi_t) * pb, 2: rb * pb, 3: rb * pb + spec.largest_layer * 2 * pb + pf * pb}[zero_stage]
    logits = act["logits_transient"] if p == 1 or last >= first else 0
    buffers = buckets + logits

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
            "every_k": k if checkpointing == "every_k" else None,
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
        },
    }
    out["fit"] = fits(out["total"], gpu, headroom) if gpu else None
    return out


def fit_search(spec, gpu, headroom=DEFAULT_HEADROOM, optimizers=("adamw", "adamw_8bit", "torchao_adamw_4bit"), **kw):
    """Every ZeRO stage x offload x checkpointing x optimizer that fits `gpu`, fastest (then smallest) first."""
    gpu_memory(gpu)
    rows = []
    for stage in (0, 1, 2, 3) if kw.get("pipeline_stages", 1) == 1 else (0, 1):
        offloads = [(False, False)] + ([(True, False)] if stage else []) + ([(True, True)] if stage == 3 else [])
        for off_opt, off_par in offloads:
            for ckpt in ("none", "every_k", "full"):
                for opt in optimizers:
                    if opt in LOW_BIT and (off_opt or stage == 3):
                        continue
                    plan = plan_memory(
                        spec,
                        zero_stage=stage,
                        offload_optimizer=off_opt,
                        offload_param=off_par,
                        checkpointing=ckpt,
                        optimizer=opt,
                        gpu=gpu,
                        headroom=headroom,
                        **kw,
                    )
                    if plan["fit"]["fits"]:
                        rows.append(
                            {
                                "zero_stage": stage,
                                "offload_optimizer": off_opt,
                                "offload_param": off_par,
                                "checkpointing": ckpt,
                                "optimizer": opt,
                                "total": plan["total"],
                                "cpu_offload_per_node": plan["cpu_offload_per_node"],
                                "relative_step_time": step_cost(stage, off_opt, off_par, ckpt, opt),
                            }
                        )
    return sorted(rows, key=lambda r: (r["relative_step_time"], r["total"]))


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


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_arguments(parser):
    m = parser.add_argument_group("model (a config/dir/hub name, or explicit numbers)")
    m.add_argument("--model", help="config.json file, local model directory or hub name")
    for flag, kind in (
        ("--params", float),
        ("--layers", int),
        ("--hidden", int),
        ("--heads", int),
        ("--vocab", int),
        ("--ffn", int),
    ):
        m.add_argument(
            flag,
            type=kind,
            help="vocab defaults to the config's, else 50257 (byte tokenizer: 257)" if flag == "--vocab" else None,
        )
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-param", action="store_true")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="default: the model's positions, at most 1024")
    parser.add_argument("--precision", default="bf16", help="fp32 | bf16 | fp16")
    parser.add_argument("--checkpointing", default="none", help=" | ".join(CHECKPOINTING))
    parser.add_argument("--every-k", type=int, help="every_k segment length (default round(sqrt(layers)))")
    parser.add_argument("--optimizer", default="adamw", help=" | ".join(OPTIMIZERS))
    parser.add_argument("--frozen-fraction", type=float, default=0.0)
    parser.add_argument("--pipeline-stages", type=int, default=1)
    parser.add_argument("--device", default="cuda", help="cuda | cpu (CPU runs keep float dropout masks)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], help="default: the model config's")
    parser.add_argument("--gpu", help=f"GPU to fit: {', '.join(GPUS)}")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="fraction kept free (default 0.1)")
    parser.add_argument("--fit", action="store_true", help="search setups that fit --gpu, fastest first")
    parser.add_argument("--deepspeed", action="store_true", help="also show DeepSpeed's own estimate (ZeRO 2/3)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _fmt(n):
    return f"{n / GiB:9.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:9.1f} MiB"


def run(ns) -> int:
    explicit = [ns.params, ns.layers, ns.hidden, ns.heads, ns.ffn]
    if (ns.model is None) == all(v is None for v in explicit):
        raise _bad("--model", "give a model in exactly one way", "--model FILE|DIR|NAME, or --layers --hidden --heads")
    spec = load_model_spec(
        ns.model, params=ns.params, layers=ns.layers, hidden=ns.hidden, heads=ns.heads, vocab=ns.vocab, ffn=ns.ffn
    )
    kw = dict(
        gpus_per_node=ns.gpus,
        nodes=ns.nodes,
        micro_batch=ns.micro_batch,
        seq_len=ns.seq_len,
        precision=ns.precision,
        every_k=ns.every_k,
        frozen_fraction=ns.frozen_fraction,
        pipeline_stages=ns.pipeline_stages,
        device=ns.device,
        attention=ns.attention,
    )
    if ns.fit:
        if not ns.gpu:
            raise _bad("--gpu", "--fit needs a GPU to fit", f"give --gpu, one of {', '.join(GPUS)}")
        rows = fit_search(spec, ns.gpu, ns.headroom, **kw)
        if ns.json:
            print(
                json.dumps(
                    {"model": spec.name, "params": spec.params, "gpu": gpu_memory(ns.gpu)[0], "fits": rows}, indent=2
                )
            )
        else:
            print(
                f"{spec.name}: {spec.params:,} params on {ns.nodes}x{ns.gpus} {gpu_memory(ns.gpu)[0]}; "
                f"{len(rows)} setup(s) fit (headroom {ns.headroom:.0%}), fastest first:"
            )
            print(
                f"  {'ZeRO':>4} {'offload':<15} {'checkpointing':<13} {'optimizer':<18} {'per GPU':>13} "
                f"{'CPU/node':>13} {'time':>5}"
            )
            for r in rows:
                off = "opt+param" if r["offload_param"] else "optimizer" if r["offload_optimizer"] else "none"
                print(
                    f"  {r['zero_stage']:>4} {off:<15} {r['checkpointing']:<13} {r['optimizer']:<18} "
                    f"{_fmt(r['total'])} {_fmt(r['cpu_offload_per_node'])} {r['relative_step_time']:5.2f}"
                )
        return 0 if rows else 1
    plan = plan_memory(
        spec,
        zero_stage=ns.zero,
        offload_optimizer=ns.offload_optimizer,
        offload_param=ns.offload_param,
        checkpointing=ns.checkpointing,
        optimizer=ns.optimizer,
        gpu=ns.gpu,
        headroom=ns.headroom,
        **kw,
    )
    if ns.deepspeed:
        plan["deepspeed_estimate"] = deepspeed_estimate(
            spec, ns.zero, ns.gpus, ns.nodes, ns.offload_optimizer, ns.offload_param
        )
    if ns.json:
        print(json.dumps(plan, indent=2))
        return 0
    i = plan["inputs"]
    print(
        f"model: {spec.name}: {spec.params:,} params{'' if spec.exact else ' (estimated)'}, {spec.layers} layers, "
        f"h={spec.hidden}, {spec.heads} heads, vocab {spec.vocab}"
    )
    print(
        f"setup: ZeRO-{i['zero_stage']}{' +offload optimizer' if i['offload_optimizer'] else ''}"
        f"{' +offload params' if i['offload_param'] else ''}, {ns.nodes}x{ns.gpus} GPUs, {i['precision']}, "
        f"micro-batch {i['micro_batch']} x {i['seq_len']} tokens, checkpointing {i['checkpointing']}, "
        f"{i['optimizer']}, frozen {i['frozen_fraction']:.0%}, pipeline stages {i['pipeline_stages']}"
    )
    for key in ("parameters", "gradients", "optimizer_states", "activations", "buffers", "total"):
        print(f"  {key.replace('_', ' '):<18} {_fmt(plan[key])}")
    if plan["cpu_offload_per_node"]:
        print(f"  {'CPU per node':<18} {_fmt(plan['cpu_offload_per_node'])}  (offloaded states)")
    if plan.get("deepspeed_estimate"):
        d = plan["deepspeed_estimate"]
        print(f"  DeepSpeed's estimator (model states only): GPU {_fmt(d['gpu'])}, CPU {_fmt(d['cpu'])}")
    if plan["fit"]:
        f = plan["fit"]
        print(
            f"fits {f['gpu']} ({f['memory'] / GiB:.0f} GiB, {_fmt(f['usable']).strip()} usable with "
            f"{f['headroom']:.0%} headroom): {'yes' if f['fits'] else 'NO'}"
        )
    return 0
