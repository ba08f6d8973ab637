"""The correctness worker of tests/test_sequence_parallel.py::test_sp_matches_unsplit, run under torchrun:

    torchrun --nproc_per_node 2 tests/sp_worker.py OUT.json SP

Every rank builds the same tiny Llama; it computes the unsplit loss and gradients of every micro-batch (tiling off
and on), then registers DeepSpeed's Ulysses attention on groups of SP ranks and computes them again from the
sequence shards (dsrecipes.parallel.sequence: SequenceShardedLoader, sequence_loss); rank 0 writes the figures.
"""

from __future__ import annotations

import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = "configs/models/tiny_llama.json"
SEQ, BATCH = 32, 2
VARIANTS = {  # name -> (tiled_mlp, tiled_loss)
    "plain": (False, False),
    "tiled_mlp": (True, False),
    "tiled_loss": (False, True),
    "tiled_both": (True, True),
}


# ----------------------------------------------------------------------------- the worker (torchrun, 2 ranks)
def _args(sp: int, tiled_mlp: bool, tiled_loss: bool):
    return types.SimpleNamespace(
        sequence_parallel_size=sp, tiled_mlp=tiled_mlp, tiled_loss=tiled_loss, tiled_mlp_shards=3, tiled_loss_shards=3
    )


def _batches(vocab: int, n: int):
    """n micro-batches per kind (one per rank): LM (every label) and SFT (prompt labels -100; in batch 1 the whole
    first half of both rows, i.e. all of SP rank 0's shard, is unlabelled)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    for kind in ("lm", "sft"):
        batches = []
        for b in range(n):
            ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
            labels = ids.clone()
            if kind == "sft":
                for row, prompt in enumerate((SEQ // 2 + 3, SEQ // 2 + 1) if b % 2 else (7 + b, 12)):
                    labels[row, :prompt] = -100
            batches.append({"input_ids": ids, "labels": labels})
        out[kind] = batches
    return out


def _loss_and_grads(model, batch, args):
    from dsrecipes.parallel import sequence

    model.zero_grad(set_to_none=True)
    loss = sequence.sequence_loss(model, dict(batch), args)
    loss.backward()
    return loss.detach().double(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worker(out_path: str, sp: int) -> None:
    """Every rank builds the same model; the unsplit references first, then Ulysses on groups of `sp` ranks. Rank r's
    loader holds batch r, so SP group g's micro-batch i is batch g*sp + i; its gradients averaged over all ranks (what
    ZeRO-3's reduce-scatter does; under ZeRO 0-2, which sum the SP ranks', sequence_loss scales the backward by 1/sp:
    tests/test_sequence_parallel_cells.py) must equal the mean over the groups of the unsplit gradients."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsrecipes.parallel import sequence

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, LLAMA))
    config.vocab_size = 97
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # same seed: same weights per rank
    data = _batches(config.vocab_size, world)
    plain_forward = {id(b.mlp): b.mlp.forward for b in model.model.layers}

    def set_tiling(on: bool):
        if on:
            sequence._patch_tiled_mlp(model, 3)
        else:
            for b in model.model.layers:
                b.mlp.forward = plain_forward[id(b.mlp)]

    ref = {}  # unsplit references (every rank computes the same), with and without tiling
    for kind, batches in data.items():
        for j, batch in enumerate(batches):
            for name, (t_mlp, t_loss) in VARIANTS.items():
                set_tiling(t_mlp)
                ref[kind, j, name] = _loss_and_grads(model, batch, _args(1, t_mlp, t_loss))
    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=sp, micro_batch_size=BATCH
    )
    acc = types.SimpleNamespace(device=torch.device("cpu"))
    groups, group = world // sp, rank // sp
    rows = []
    for kind, batches in data.items():
        loader = sequence.SequenceShardedLoader([batches[rank]], acc, sp)
        for i, shard in enumerate(loader):  # micro-batch i: every rank's shard of its group's batch group*sp + i
            assert shard["input_ids"].shape == (BATCH, SEQ // sp)
            for name, (t_mlp, t_loss) in VARIANTS.items():
                set_tiling(t_mlp)
                loss, grads = _loss_and_grads(model, shard, _args(sp, t_mlp, t_loss))
                for g in grads.values():
                    dist.all_reduce(g)
                    g /= world
                want = {n: sum(ref[kind, k * sp + i, name][1][n] for k in range(groups)) / groups for n in grads}
                base = {n: sum(ref[kind, k * sp + i, "plain"][1][n] for k in range(groups)) / groups for n in grads}
                rows.append(
                    {
                        "kind": kind,
                        "batch": group * sp + i,
                        "variant": name,
                        "loss": loss.item(),
                        "ref_loss": ref[kind, group * sp + i, name][0].item(),
                        "untiled_ref_loss": ref[kind, group * sp + i, "plain"][0].item(),
                        "grad_max_diff": max((grads[n] - want[n]).abs().max().item() for n in grads),
                        "tiling_grad_max_diff": max((want[n] - base[n]).abs().max().item() for n in grads),
                        "grad_max": max(want[n].abs().max().item() for n in grads),
                        "labelled_on_rank": int((shard["shift_labels"] != -100).sum()),
                    }
                )
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "src"))
    worker(sys.argv[1], int(sys.argv[2]))
