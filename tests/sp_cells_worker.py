"""The multi-cell worker of tests/test_sequence_parallel_cells.py, run under torchrun (2 gloo ranks, one SP group):

    torchrun --nproc_per_node 2 tests/sp_cells_worker.py OUT.json [CELL ...]   # CELL: zero2-hf_full-mlp+loss

Every cell of config/compat_sp.py's SP grid that the rule table allows (ZeRO 0-3 x checkpointing x tiling, sp=2 on
2 processes) trains 2 optimizer steps in this one process group, through the recipes' own code: the same tiny Llama
weights (configs/models/tiny_llama.json), dsrecipes.parallel.sequence.prepare_model (sdpa, TiledMLP),
memory.activation_checkpointing.apply_activation_checkpointing (the cell's mode; `deepspeed` configured from the
JSON's activation_checkpointing section as the recipe does), train.optimizers.build_optimizer (AdamW),
deepspeed.initialize with the shipped configs/deepspeed/zero{0,1,2,3}.json (config.deepspeed.fill_auto) and
DeepSpeed's SP mpu (parallel_state_sp, from UlyssesSPAttentionHF.register_with_transformers as accelerate does),
sequence.SequenceShardedLoader for the shards and sequence.loss_hook(args, lm_loss) for the loss. Not accelerate:
DeepSpeed's engine directly (accelerate's part, the mpu and the data adapter, is done the same way here).

One sp=1 reference (no SP, no tiling, no checkpointing, no DeepSpeed) trains the same 2 steps on the same 2
batches first; rank 0 writes one row per cell: both steps' losses and the reference's, and per parameter tensor the
relative difference of its 2-step update from the reference update (every tensor must have moved: with weight
decay 0, AdamW moves only a parameter that got a gradient).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = "configs/models/tiny_llama.json"
SEQ, BATCH, VOCAB, STEPS, LR = 32, 2, 97, 2, 1e-2
# Cells the rule table refuses (config/rules_sp.py), trained anyway to show why: name -> (zero, checkpointing,
# tiling, zero_optimization overrides). ZeRO-3 with reduce_scatter false trains, with the wrong gradient
# (sp_zero3_reduce_scatter_off); ZeRO-3 + selective_ops + tiled_loss is not run (it fails in backward).
UNGUARDED = {"zero3-reduce_scatter_false": (3, "none", "none", {"reduce_scatter": False})}
CKPT_MODE = {"hf_full": "full"}  # compat_sp's checkpointing name -> the recipe's gradient_checkpointing value


def allowed_cells() -> list[tuple[int, str, str]]:
    """Every DeepSpeed cell of the SP grid that the rule table does not refuse (sp=2 on 2 processes)."""
    from dsrecipes.config import compat_sp

    return compat_sp.engine_cells()


def cell_args(sp: int, ckpt: str = "none", tiling: str = "none"):
    """The recipe fields the library's functions read (config/fields*.py names and defaults)."""
    return types.SimpleNamespace(
        sequence_parallel_size=sp,
        tiled_mlp="mlp" in tiling,
        tiled_loss="loss" in tiling,
        tiled_mlp_shards=2,
        tiled_loss_shards=2,
        gradient_checkpointing=CKPT_MODE.get(ckpt, ckpt),
        gradient_checkpointing_reentrant=False,
        checkpoint_every_k=0,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_grad_norm=0.0,
        learning_rate=LR,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optimizer="adamw",
        packing=False,
    )


def ds_config(zero: int, ckpt: str, args, zero_extra: dict | None = None) -> dict:
    """The shipped ZeRO JSON, "auto" filled for one SP group (data-parallel size 1); `deepspeed` checkpointing adds
    the activation_checkpointing section of configs/deepspeed/zero3_actckpt.json."""
    from dsrecipes.config.deepspeed import fill_auto

    with open(os.path.join(ROOT, "configs", "deepspeed", f"zero{zero}.json")) as fh:
        ds = json.load(fh)
    if ckpt == "deepspeed":
        with open(os.path.join(ROOT, "configs", "deepspeed", "zero3_actckpt.json")) as fh:
            ds["activation_checkpointing"] = json.load(fh)["activation_checkpointing"]
    ds["zero_optimization"] |= zero_extra or {}
    ds = fill_auto(ds, args, 1, "no", hidden_size=128)
    return ds | {"zero_allow_untested_optimizer": True}


def batches():
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def fresh_model(config, state):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.load_state_dict(state)
    return model.train()


def full_params(engine) -> dict:
    """name -> the full fp32 parameter (ZeRO-3: gathered)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        return {n: p.detach().clone().float() for n, p in params}


def count_calls(model) -> dict:
    """Forward calls per module in step 1 (forward and backward): each block's attention (1, or 2 where
    checkpointing recomputes the block), block 0's MLP down_proj (once per tile, again where TiledMLP or
    checkpointing recomputes it) and the head (once per loss tile, again where the tiled loss recomputes it)."""
    from dsrecipes.train.models import decoder_parts

    calls = {}
    named = {f"attn{i}": block.self_attn for i, block in enumerate(decoder_parts(model)["blocks"])}
    named |= {"mlp0_down": decoder_parts(model)["blocks"][0].mlp.down_proj, "head": model.get_output_embeddings()}
    for name, module in named.items():
        calls[name] = 0
        module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def reference(config, state, data) -> tuple[list[float], dict]:
    """sp=1, no tiling, no checkpointing, no DeepSpeed: the losses of both steps and the first step's gradients."""
    from dsrecipes.parallel import sequence
    from dsrecipes.train.optimizers import build_optimizer

    args = cell_args(1)
    model = fresh_model(config, state)
    optimizer = build_optimizer(model, args)
    losses, grads = [], {}
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        loss = sequence.sequence_loss(model, dict(batch), args)
        loss.backward()
        grads = grads or {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return losses, grads


def run_cell(zero, ckpt, tiling, config, state, data, rank, mpu, zero_extra=None) -> dict:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    from dsrecipes.memory.activation_checkpointing import apply_activation_checkpointing
    from dsrecipes.parallel import sequence
    from dsrecipes.train.loop import lm_loss
    from dsrecipes.train.optimizers import build_optimizer

    args = cell_args(2, ckpt, tiling)
    ds = ds_config(zero, ckpt, args, zero_extra)
    model = fresh_model(config, state)
    sp_info = sequence.prepare_model(model, args, "sp_cells_worker")
    ckpt_info = apply_activation_checkpointing(model, args, ds_config=ds)
    calls = count_calls(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, args), config=ds, mpu=mpu)
    compute_loss = sequence.loss_hook(args, lm_loss)
    loader = sequence.SequenceShardedLoader([data[rank]], types.SimpleNamespace(device=torch.device("cpu")), 2)
    losses, grads, shapes = [], None, []
    for shard in loader:  # micro-batch i: this rank's half of batch i (batch i is rank i's)
        loss, _ = compute_loss(engine, shard)
        engine.backward(loss)
        if grads is None:  # the first step's gradients, averaged over the ranks (ZeRO: gathered from partitions)
            grads = {n: safe_get_full_grad(p).detach().clone().float() for n, p in engine.module.named_parameters()}
            calls = dict(calls)  # forward and backward of step 1 done: the counts stop here
        engine.step()
        losses.append(loss.item())
        shapes.append(list(shard["input_ids"].shape))
    after = full_params(engine)
    facts = {"zero_stage": engine.zero_optimization_stage(), "sp_size": engine.sequence_parallel_size}
    engine.destroy()
    facts |= {"losses": losses, "grads": grads, "after": after, "shapes": shapes, "calls": calls}
    return facts | {"checkpointing": ckpt_info, "sp_info": sp_info}


def worker(out_path: str, only: list[str]) -> None:
    import datetime
    import gc

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsrecipes.config import compat_sp

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, LLAMA))
    config.vocab_size = VOCAB
    state = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").state_dict()  # same seed per rank
    data = batches()
    t0 = time.time()
    ref_losses, ref_grads = reference(config, state, data)  # before Ulysses replaces sdpa
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=fresh_model(config, state),
        core_attn_implementation="sdpa",
        sequence_parallel_size=2,
        micro_batch_size=BATCH,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
    rows = [{"cell": "reference", "losses": ref_losses, "seconds": time.time() - t0}]
    cells = [(compat_sp.cell_id(*c), *c, {}) for c in allowed_cells()]
    cells += [("unguarded:" + name, *cell) for name, cell in UNGUARDED.items()]  # last
    for name, zero, ckpt, tiling, extra in cells:
        if only and name not in only:
            continue
        t = time.time()
        row = {"cell": name, "zero": zero, "checkpointing": ckpt, "tiling": tiling, "ref_losses": ref_losses}
        try:
            got = run_cell(zero, ckpt, tiling, config, state, data, rank, mpu, extra)
        except Exception as exc:  # recorded per cell; the next cell runs (both ranks fail alike: same code, data)
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
        else:
            grad_err = {
                n: ((got["grads"][n] - ref).norm() / ref.norm().clamp(min=1e-30)).item() for n, ref in ref_grads.items()
            }
            row |= {
                "losses": got["losses"],
                "zero_stage": got["zero_stage"],
                "sp_size": got["sp_size"],
                "shard_shapes": got["shapes"],
                "checkpointing_info": got["checkpointing"],
                "sequence_parallel": got["sp_info"],
                "grad_rel_err_max": max(grad_err.values()),
                "grad_rel_err_worst": max(grad_err, key=grad_err.get),
                "unmoved": [n for n in ref_grads if not (got["after"][n] != state[n]).any()],
                "params": len(ref_grads),
                "calls": got["calls"],
            }
        row["seconds"] = round(time.time() - t, 2)
        rows.append(row)
        gc.collect()
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh, indent=1)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "src"))
    worker(sys.argv[1], sys.argv[2:])
