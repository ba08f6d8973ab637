"""Bytes saved for backward by one micro-batch, per rank, term by term as HF GPT-2 and HF Llama/Qwen2 save them
(calibrated with saved-tensor hooks: tests/test_planner.py, docs/planner.md), with sequence parallelism (Ulysses:
sp), tensor parallelism (AutoTP: tp) and the ALST tiling (tiled MLP, tiled logits + loss).

    act = activation_bytes(spec, micro_batch=2, seq_len=512, precision="fp32", device="cpu", sp=2, tiled_mlp=True)
    act["layer"], act["embed"], act["head"], act["block_input"], act["logits_transient"], act["sp_all_to_all"]
Used by dsrecipes.memory.planner.plan_memory.
"""

from __future__ import annotations

import math


def activation_bytes(
    spec,
    micro_batch,
    seq_len,
    precision="bf16",
    device="cuda",
    attention=None,
    *,
    sp=1,
    tp=1,
    tiled_mlp=False,
    tiled_loss=False,
    mlp_shards=None,
    loss_shards=None,
):
    """Per-rank bytes one micro-batch saves: per transformer block ("layer", of which "layer_replicated" does not
    shrink under tp), embeddings ("embed", plus "rope" when any block keeps its activations), the final norm/LM
    head/loss ("head"), a checkpointed block's input ("block_input"); the transients "logits_transient" (logits and
    their gradient around the loss), "sp_all_to_all" (Ulysses send/receive copies) and "mlp_recompute" (one MLP
    tile recomputed in backward when tiled). Sequence parallelism gives each rank seq_len / sp tokens; attention
    sees the whole sequence with heads / sp."""
    attention = attention or spec.attention
    e = 4 if precision == "fp32" else 2
    sl = math.ceil(seq_len / sp)
    t = sl * micro_batch  # tokens on this rank
    mlp_shards = mlp_shards or max(1, math.ceil(sl / spec.hidden))  # DeepSpeed TiledMLP's default: ceil(s / h)
    # the recipes' tiled loss (dsrecipes.parallel.sequence): tiles of at most 2^24 logits, at most one per token
    loss_shards = min(sl, loss_shards or max(1, math.ceil(t * spec.vocab / 2**24)))
    family = _llama if spec.family == "llama" else _gpt2
    out = family(spec, micro_batch, seq_len, t, e, device == "cpu", attention, sp, tp)
    if tiled_mlp:  # TiledMLP keeps only its input (the norm output, already counted) and recomputes per tile
        out["mlp_recompute"] = math.ceil(out["mlp"] / mlp_shards)
        out["layer"] -= out["mlp"]
        out["mlp"] = 0
    else:
        out["mlp_recompute"] = 0
    V = spec.vocab
    if tiled_loss:  # TiledFusedLogitsLoss: backward runs inside forward per tile and keeps only d(loss)/d(hidden)
        out["head"] -= 4 * t * V + 8 * t  # no fp32 log-softmax, no int64 targets
        out["logits_transient"] = (e + 4) * math.ceil(t / loss_shards) * V
    else:
        out["logits_transient"] = (e + 4) * t * V
    out["block_input"] = e * t * spec.hidden
    kv_rep = max(spec.kv_heads, sp)  # Ulysses replicates K/V heads when there are fewer than sp
    a2a = 2 * e * t * spec.head_dim * (spec.heads + 2 * kv_rep) // tp + 2 * e * t * spec.heads * spec.head_dim // tp
    out["sp_all_to_all"] = a2a if sp > 1 else 0
    out.update(mlp_shards=mlp_shards if tiled_mlp else None, loss_shards=loss_shards if tiled_loss else None)
    return out


def _llama(spec, b, s, t, e, cpu, attention, sp, tp):
    """HF Llama/Qwen2 in transformers 5 (RMSNorm, RoPE, GQA, SwiGLU), measured term by term on CPU."""
    h, f, a, kv, d, V = spec.hidden, spec.ffn, spec.heads, spec.kv_heads, spec.head_dim, spec.vocab
    # RMSNorm upcasts to fp32: the fp32 input (in fp32 the residual stream itself), x * rsqrt, the weighted output
    # (the next Linear's input), and the fp32 rsqrt per token
    norm = (4 + 2 * e) * t * h + 4 * t
    ac = a // tp // sp  # query heads in the attention core (full sequence under Ulysses)
    kvc = max(kv // tp // sp, 1)
    if attention == "eager":  # q, K and V repeated to all heads, fp32 softmax (+ its cast in 16-bit), o_proj input
        core = 3 * e * s * b * ac * d + (4 + (e if e < 4 else 0)) * ac * s * s * b
        o_in = e * t * a * d // tp
    else:  # fused sdpa kernel: q, k, v (KV heads: GQA), output, fp32 logsumexp per head and row
        core = e * s * b * d * (2 * ac + 2 * kvc) + 4 * ac * s * b
        o_in = e * t * a * d // tp if sp > 1 else 0  # the all-to-all back is a new tensor; else the output is it
    mlp = 4 * e * t * f // tp  # gate and up outputs, SiLU output, down_proj input
    layer = 2 * norm + core + o_in + mlp
    return {
        "layer": layer,
        "layer_replicated": 2 * norm,
        "mlp": mlp,
        "embed": 8 * t,  # token ids (the embedding output is the first norm's input)
        "rope": 2 * e * math.ceil(s / sp) * d,  # cos and sin, saved once by the first block that keeps activations
        "head": norm + 4 * t * V + 8 * t + 4,  # final norm, fp32 log-softmax, int64 targets, the loss scalar
    }


def _gpt2(spec, b, s, t, e, cpu, attention, sp, tp):
    """HF GPT-2 (Korthikanti et al. 2022, term by term; 34sbh + 5as^2b per block in 16-bit on CUDA)."""
    h, a, f, V = spec.hidden, spec.heads, spec.ffn, spec.vocab
    sbh = t * h
    m = e if cpu else 1  # dropout keeps a mask: on CPU a scaled float mask of the input dtype, on CUDA a bool mask
    g = 4 if spec.activation == "gelu_new" else 1  # HF's gelu_new is Python (pow, tanh, 2 muls): 4 saved tensors
    ss = s * math.ceil(s / sp)  # attention scores per head, heads / sp under Ulysses
    rep = 4 * e * sbh + 2 * 2 * e * t + (2 * m * sbh if spec.resid_dropout else 0)  # ln_1/ln_2 in, c_attn/c_fc in
    layer = rep + e * sbh // tp  # c_proj input
    mlp = (1 + g) * e * t * f // tp  # GELU saves + input of the second MLP matmul
    layer += mlp
    if attention == "eager" or (cpu and spec.attn_dropout):  # unfused attention ("math" path)
        ce = 4 if cpu and attention != "eager" else e  # CPU sdpa's math path upcasts to fp32
        layer += 3 * ce * sbh // tp  # q, k, v copies for the two batched matmuls
        layer += a * ss * b * (ce + ((ce if cpu else 1) + ce if spec.attn_dropout else 0)) // tp  # softmax, masks
    else:  # fused kernel: q/k/v (CPU flash also keeps contiguous k, v copies) + fp32 logsumexp; output = c_proj input
        layer += ((5 if cpu else 3) * e * sbh + 4 * a * t) // tp + (e * sbh // tp if sp > 1 else 0)
    return {
        "layer": layer,
        "layer_replicated": rep,
        "mlp": mlp,
        "embed": 8 * t + 8 * math.ceil(s / sp) + (m * sbh if spec.embd_dropout else 0),  # ids, positions, dropout
        "rope": 0,
        "head": 2 * e * sbh + 2 * e * t + 4 * t * V + 8 * t + 4,  # ln_f in + stats, lm_head in, fp32 log-softmax
    }
