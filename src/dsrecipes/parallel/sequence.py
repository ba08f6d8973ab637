"""Ulysses sequence parallelism (DeepSpeed ALST) and ALST tiling for the shared training loop.

    accelerator = make_accelerator(args, ...)          # passes parallelism_config(args): accelerate's SP switch
    info = sequence.prepare_model(model, args, where)  # sdpa attention, TiledMLP on every decoder MLP
    model, ..., train_dl, eval_dl, ... = accelerator.prepare(...)
    train_dl, eval_dl = sequence.loaders(accelerator, train_dl, eval_dl, args)   # resumable sharded train loader
    loop.run(..., sequence.loss_hook(args, lm_loss))   # the loss over the whole sequence, from its shards

With sequence_parallel_size = N the ranks form groups of N; a group trains on one micro-batch at a time, each rank
holding 1/N of every sequence (DeepSpeed's UlyssesSPDataLoaderAdapter collects one batch from each rank of the group
and hands every rank its slice of each, so one pass over a rank's loader gives N micro-batches). Attention runs on
the whole sequence through all-to-all (UlyssesSPAttentionHF, registered by accelerate at prepare()); everything else
is per token. The loss of the group is sum(per-token CE over labels != -100 on every shard) / their count over the
group: a differentiable all-reduce of each shard's sum divided by the (constant) global count, so that it and its
gradient equal the loss of the unsplit sequence (tests/test_sequence_parallel.py). Eval runs unsplit: DeepSpeed's
disable_in_eval bypasses the all-to-all when the model is in eval mode, and the eval loader is the plain one.

Tiling (ALST): tiled_mlp runs each decoder MLP in sequence tiles (DeepSpeed TiledMLP: recomputed in backward, so only
one tile's intermediate activations live at a time); tiled_loss computes the head's logits and the cross-entropy
tile by tile with DeepSpeed's sequence_tiled_compute (the [batch, seq, vocab] logits never exist). Both work with
and without SP; the loss is a sum over tokens, divided as above.
"""

from __future__ import annotations

import math
import os
import types

import torch

from dsrecipes import compat
from dsrecipes.config import fields_parallel
from dsrecipes.config.errors import ConfigError

LOSS_TILE_LOGITS = 2**24  # tiled_loss_shards auto: at most this many logits (64 MiB in fp32) per tile


def sp_size(args) -> int:
    """sequence_parallel_size of the run's args (1 = off), by the reader of the rule table's sp axis."""
    return fields_parallel.sp_size(args)


def tiling_on(args) -> bool:
    return bool(getattr(args, "tiled_mlp", False) or getattr(args, "tiled_loss", False))


def parallelism_config(args):
    """accelerate's ParallelismConfig for Ulysses SP through DeepSpeed, or None (sp = 1, or not a DeepSpeed launch:
    the rule table then refuses SP without DeepSpeed in one line, config/rules_sp.py)."""
    if sp_size(args) <= 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import ParallelismConfig
    from accelerate.utils.dataclasses import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    # dp_shard_size: the number of SP groups (data parallel between them; ZeRO shards over all ranks). accelerate
    # computes DeepSpeed's train_batch_size from it; left at 1 with sp < world, DeepSpeed's batch check fails.
    groups = max(1, int(os.environ.get("WORLD_SIZE", "1")) // sp_size(args))
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp_size(args), dp_shard_size=groups, sp_handler=handler)


def checkpoint_facts(args) -> dict:
    """What the trainer state records (Loop extra_state), so that a resume can check the SP layout."""
    return {"sequence_parallel_size": sp_size(args)}


def check_resume(args, where: str) -> None:
    """Before the Session loads anything: an SP run resumes only on the layout it was written with (same
    sequence_parallel_size and number of processes), where the resume is exact (tests/test_sequence_parallel.py).
    DeepSpeed 0.19 selects the checkpoint file of SP ranks > 0 by their SP rank when the layout changes (#8226, fixed
    after 0.19.8): refused in one line instead."""
    from dsrecipes.train.checkpoints import find_checkpoint, read_state

    path = find_checkpoint(args.output_dir, getattr(args, "resume_from", None))
    if not path:
        return
    state = read_state(path)
    saved, procs = int(state.get("sequence_parallel_size", 1)), (state.get("world") or {}).get("processes")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if saved == sp_size(args) and (saved == 1 or procs in (None, world)):
        return
    raise ConfigError(
        where,
        "resume_from",
        f"{path} was written with sequence_parallel_size {saved} on {procs} processes, this run has "
        f"{sp_size(args)} on {world}: resuming across a change of the sequence-parallel layout loads the wrong "
        "checkpoint shard on SP ranks > 0 in DeepSpeed 0.19 (DeepSpeed #8226)",
        "resume with the same sequence_parallel_size and number of processes (exact), or start a new output_dir",
    )


def prepare_model(model, args, where: str) -> dict | None:
    """Before accelerator.prepare: check the model can be split along the sequence, switch eager attention to sdpa
    (Ulysses refuses eager, which needs a 4-D mask), patch TiledMLP into every decoder MLP. Returns the summary's
    `sequence_parallel` facts, or None when neither SP nor tiling is on."""
    if sp_size(args) <= 1 and not tiling_on(args):
        return None
    text = model.config.get_text_config()
    if getattr(text, "num_key_value_heads", None) is None or not hasattr(model, "get_decoder"):
        raise ConfigError(
            where,
            "sequence_parallel_size" if sp_size(args) > 1 else ("tiled_mlp" if args.tiled_mlp else "tiled_loss"),
            f"{type(model).__name__} is not a Llama-family decoder (DeepSpeed's Ulysses attention and the tiling need "
            "num_key_value_heads, RoPE position ids and a separate decoder and head)",
            "use a Llama-family model_config (configs/models/tiny_llama.json, tiny_qwen2.json), or set "
            "sequence_parallel_size: 1, tiled_mlp: false, tiled_loss: false",
        )
    if sp_size(args) > 1 and getattr(args, "packing", False):
        raise ConfigError(
            where,
            "packing",
            "DeepSpeed's Ulysses attention drops the block-diagonal mask that packed position ids give sdpa (it keeps "
            "only flex_attention's BlockMask), so packed conversations would attend to each other",
            "set packing: false with sequence_parallel_size > 1 (padding, right-aligned, is exact)",
        )
    attn = compat.attn_implementation(model.config)
    if attn in (None, "eager"):
        compat.set_attn_implementation(model.config, "sdpa")
    mlp_shards = _patch_tiled_mlp(model, args.tiled_mlp_shards) if args.tiled_mlp else None
    return {
        "sp_size": sp_size(args),
        "attn_implementation": compat.attn_implementation(model.config),
        "tiled_mlp": bool(args.tiled_mlp),
        "tiled_mlp_shards": mlp_shards,
        "tiled_loss": bool(args.tiled_loss),
        "tiled_loss_shards": args.tiled_loss_shards or "auto",
    }


def _patch_tiled_mlp(model, shards: int):
    """Every decoder block's MLP forward runs through DeepSpeed's TiledMLP (instance attribute: the class stays)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    from dsrecipes.train.models import decoder_parts

    def tiled_forward(mlp):
        plain = type(mlp).forward

        def forward(x):
            n = shards or max(1, math.ceil(x.shape[-2] / x.shape[-1]))  # ALST: ceil(seqlen / hidden)
            # the MLP's parameters now, not at patching: LoRA adds its adapters after prepare_model, and ZeRO must
            # hold their gradients until the last tile too (else ZeRO-2: "has already been reduced";
            # tests/test_sequence_parallel.py::test_lora_with_tiling_matches_sp1)
            return TiledMLP.apply(plain, mlp, x, n, list(mlp.parameters()))

        return forward

    for block in decoder_parts(model)["blocks"]:
        block.mlp.forward = tiled_forward(block.mlp)
    return shards or "auto"


# ----------------------------------------------------------------------------- data
class _WithPositionIds:
    """The rank's loader with position_ids in every batch (Ulysses needs them before sharding) and per-row values
    that are not [batch, seq] tensors (SFT's real_tokens) kept out of the sharding: they ride along as lists."""

    def __init__(self, dl):
        self.dl = dl

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        for batch in self.dl:
            ids = batch["input_ids"]
            batch = dict(batch)
            if "position_ids" not in batch:
                batch["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
            for k, v in list(batch.items()):
                if torch.is_tensor(v) and (v.dim() < 2 or v.shape[:2] != ids.shape[:2]):
                    batch[k] = {"per_row": v.tolist()}
            yield batch


class SequenceShardedLoader:
    """The train loader under SP: DeepSpeed's UlyssesSPDataLoaderAdapter over the rank's prepared loader, made
    resumable for the loop (set_epoch goes to the inner loader; a fresh adapter per pass; skip_first(n) skips n of
    this loader's micro-batches: n // sp batches of the inner loader, then n % sp shards)."""

    def __init__(self, dl, accelerator, sp: int):
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        self.dl, self.acc, self.sp = dl, accelerator, sp
        self.group, self.rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()

    def __len__(self):
        return len(self.dl) * self.sp

    def set_epoch(self, epoch: int) -> None:
        self.dl.set_epoch(epoch)

    def __iter__(self):
        return self._iterate(self.dl, 0)

    def skip_first(self, n: int):
        inner = self.acc.skip_first_batches(self.dl, n // self.sp) if n >= self.sp else self.dl
        return self._iterate(inner, n % self.sp)

    def _iterate(self, dl, drop: int):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        adapter = UlyssesSPDataLoaderAdapter(
            _WithPositionIds(dl), sp_rank=self.rank, sp_group=self.group, sp_world_size=self.sp, device=self.acc.device
        )
        last = len(dl) * self.sp - 1
        for i, batch in enumerate(adapter):
            # accelerate syncs gradients early once the prepared loader has yielded its last batch; the adapter takes
            # it sp micro-batches before the pass ends, so only the pass's last micro-batch may say "end"
            if hasattr(dl, "end_of_dataloader"):
                dl.end_of_dataloader = i == last
            if i >= drop:
                yield self._unwrap(batch)

    def _unwrap(self, batch: dict) -> dict:
        for k, v in list(batch.items()):
            if isinstance(v, dict) and "per_row" in v:  # counted once per group: the group's rank 0 holds them
                t = torch.tensor(v["per_row"])
                batch[k] = t if self.rank == 0 else torch.zeros_like(t)
        return {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loaders(accelerator, train_dl, eval_dl, args):
    """After accelerator.prepare: under SP, accelerate wrapped every loader in a UlyssesSPDataLoaderAdapter; the
    train loader becomes a SequenceShardedLoader over the same prepared loader, the eval loader the plain one."""
    if sp_size(args) <= 1:
        return train_dl, eval_dl

    def plain(dl):
        return getattr(dl, "dl", dl)

    return SequenceShardedLoader(plain(train_dl), accelerator, sp_size(args)), (
        plain(eval_dl) if eval_dl is not None else None
    )


# ----------------------------------------------------------------------------- loss
def _unwrap_model(model):
    return getattr(model, "module", model)


def token_loss_sum(model, batch: dict, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token CE over labels != -100 in this rank's batch or shard, their count)."""
    labels = batch.get("shift_labels")
    if labels is None:  # an unsplit batch: shift here as the adapter does (pad one -100 on the right)
        labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if sp_size(args) > 1:
        inputs.pop("attention_mask", None)  # Ulysses masks causally from the gathered position ids
    count = (labels != -100).sum()
    if not args.tiled_loss:
        logits = model(**inputs, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return ce, count
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

    net = _unwrap_model(model)
    hidden = net.get_decoder()(**inputs, use_cache=False).last_hidden_state
    head = net.get_output_embeddings()
    seq = hidden.shape[1]
    vocab = head.weight.shape[0] if head.weight.dim() == 2 and head.weight.numel() else net.config.vocab_size
    shards = args.tiled_loss_shards or max(1, math.ceil(hidden.shape[0] * seq * vocab / LOSS_TILE_LOGITS))

    params = [head.weight]
    if head.weight is net.get_input_embeddings().weight and hidden.requires_grad:
        # Tied: the embedding's gradient is accumulated after the tiles'. ZeRO reduces a gradient when it is marked
        # ready (ds_grad_is_ready); sequence_tiled_compute marks it at the last tile, and the embedding's part
        # would then be reduced a second time (ZeRO-2: "has already been reduced"). Mark it ready only once the
        # tiles are done (hidden's gradient exists), so that the embedding's accumulation reduces the sum.
        params, weight = [], head.weight
        weight.ds_grad_is_ready = False
        hidden.register_hook(lambda grad: setattr(weight, "ds_grad_is_ready", True) or grad)

    def tile(hidden_states, labels):
        logits = head(hidden_states).float()
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )

    ce = sequence_tiled_compute(
        tile,
        seq,
        min(shards, seq),
        {"hidden_states": hidden, "labels": labels},
        {},
        "hidden_states",
        compute_params=params,
        output_unshard_dimension=0,
        output_reduction="sum",
    )
    return ce, count


def sequence_loss(model, batch: dict, args) -> torch.Tensor:
    """The mean CE over the labelled tokens of the whole (split) sequence, the same value on every rank of the SP
    group; its gradient is the unsplit loss's: the all-reduce's backward sums the group's incoming gradients, so
    the ranks' gradients average to it (what a plain module's caller and ZeRO-3's reduce-scatter do), and under a
    DeepSpeed engine that sums the SP ranks' gradients instead (ZeRO 0-2, DeepSpeed #5248, #5555) it takes 1/sp of
    that: compat.sp_gradient_scale. What no scale fixes (ZeRO-3 with reduce_scatter: false, ZeRO-3 + selective_ops
    + tiled_loss) the rule table refuses before training (config/rules_sp.py)."""
    scale = compat.sp_gradient_scale(model, sp_size(args))
    ce, count = token_loss_sum(model, batch, args)
    total = count.detach().to(torch.float32)
    if sp_size(args) > 1:
        import torch.distributed as dist
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        group = mpu.get_sequence_parallel_group()
        dist.all_reduce(total, group=group)
        return _GroupSum.apply(ce / total.clamp(min=1), group, scale)
    return ce / total.clamp(min=1)


class _GroupSum(torch.autograd.Function):
    """Differentiable sum over the SP group: forward all-reduces the shards' terms, backward all-reduces the
    incoming gradients (every rank's loss depends on every rank's term), times `scale`."""

    @staticmethod
    def forward(ctx, value, group, scale=1.0):
        import torch.distributed as dist

        ctx.group, ctx.scale = group, scale
        out = value.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad * ctx.scale, None, None


class _LossModel:
    """Stands in for the model inside a recipe's loss hook: model(**batch).loss is the sequence-aware loss."""

    def __init__(self, model, args):
        self.model, self.args = model, args

    def __call__(self, **batch):
        batch.pop("use_cache", None)
        return types.SimpleNamespace(loss=sequence_loss(self.model, batch, self.args))

    def __getattr__(self, name):
        return getattr(self.model, name)


def loss_hook(args, inner):
    """The recipe's compute_loss(model, batch) -> (loss, logs) with model(**batch).loss replaced by the sequence-
    parallel / tiled loss when SP or tiling is on (inner unchanged otherwise: lm_loss, sft's TokenCounter.loss)."""
    if sp_size(args) <= 1 and not tiling_on(args):
        return inner

    def compute_loss(model, batch):
        return inner(_LossModel(model, args), batch)

    return compute_loss
