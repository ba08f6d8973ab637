"""The LoRA and exact-match worker of tests/test_sequence_parallel.py, run under torchrun (2 gloo ranks, one SP group):

    torchrun --nproc_per_node 2 tests/sp_lora_worker.py OUT.json

1. LoRA (lora_r > 0, dsrecipes.train.lora.apply_lora: peft adapters on every Linear of the blocks, the base frozen)
   with ALST tiling at sp=2, through DeepSpeed's engine as tests/sp_cells_worker.py trains its cells (the recipe's
   order: sequence.prepare_model, then apply_lora, build_optimizer, deepspeed.initialize with the SP mpu,
   SequenceShardedLoader, loss_hook(args, lm_loss)), 2 optimizer steps, against an sp=1 LoRA reference (no tiling, no
   DeepSpeed) of the same weights and batches; and at sp=1 tiled_loss against untiled (no DeepSpeed). The adapters'
   lora_B start non-zero (peft starts it at 0, where lora_A gets no gradient), so every adapter tensor has one.
2. Greedy decoding (dsrecipes.sft.exact_match) after DeepSpeed's Ulysses attention is registered, in eval mode
   (disable_in_eval: no all-to-all): left-padded prompt batches against each prompt alone (the wrapper drops the
   attention mask), and the equal-length batches the SFT recipe uses under SP.

Rank 0 writes one row per LoRA cell, the sp=1 tiling row and the greedy row.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import types

from sp_cells_worker import LLAMA, ROOT, VOCAB, batches, cell_args, ds_config, fresh_model

LORA_CELLS = {  # name -> (ZeRO stage, tiling)
    "lora-zero2-loss": (2, "loss"),
    "lora-zero2-mlp+loss": (2, "mlp+loss"),
    "lora-zero3-mlp+loss": (3, "mlp+loss"),
}


def lora_args(sp: int, tiling: str = "none"):
    return types.SimpleNamespace(
        **vars(cell_args(sp, "none", tiling)),
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["all-linear"],
        lora_quantize="none",
        lora_export="merged",
        seed=0,
    )


def lora_model(config, state, adapters, args):
    """The recipe's order: prepare_model (sdpa, TiledMLP) on the base, then peft adapters, loaded from `adapters`."""
    from dsrecipes.parallel import sequence
    from dsrecipes.train.lora import apply_lora

    model = fresh_model(config, state)
    sequence.prepare_model(model, args, "sp_lora_worker")
    model, info = apply_lora(model, args, "sp_lora_worker")
    if adapters is not None:
        missing = set(adapters) - {n for n, _ in model.named_parameters()}
        assert not missing, missing
        model.load_state_dict(adapters, strict=False)
    return model.train(), info


def trainable_grads(named) -> dict:
    return {n: g.detach().clone().float() for n, g in named}


def reference(config, state, adapters, data, tiling: str) -> tuple[list[float], dict]:
    """sp=1, no DeepSpeed: both steps' losses and the first step's adapter gradients."""
    from dsrecipes.parallel import sequence
    from dsrecipes.train.loop import lm_loss
    from dsrecipes.train.optimizers import build_optimizer

    args = lora_args(1, tiling)
    model, _ = lora_model(config, state, adapters, args)
    optimizer = build_optimizer(model, args)
    compute_loss = sequence.loss_hook(args, lm_loss)
    losses, grads = [], None
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = compute_loss(model, dict(batch))
        loss.backward()
        if grads is None:
            grads = trainable_grads((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    return losses, grads


def run_lora_cell(zero, tiling, config, state, adapters, data, rank, mpu) -> dict:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    from dsrecipes.parallel import sequence
    from dsrecipes.train.loop import lm_loss
    from dsrecipes.train.optimizers import build_optimizer

    args = lora_args(2, tiling)
    model, info = lora_model(config, state, adapters, args)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, args), config=ds_config(zero, "none", args), mpu=mpu
    )
    compute_loss = sequence.loss_hook(args, lm_loss)
    loader = sequence.SequenceShardedLoader([data[rank]], types.SimpleNamespace(device=torch.device("cpu")), 2)
    losses, grads, shapes = [], None, []
    for shard in loader:  # micro-batch i: this rank's half of batch i
        loss, _ = compute_loss(engine, shard)
        engine.backward(loss)
        if grads is None:
            named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
            grads = trainable_grads((n, safe_get_full_grad(p)) for n, p in named)
        engine.step()
        losses.append(loss.item())
        shapes.append(list(shard["input_ids"].shape))
    facts = {"zero_stage": engine.zero_optimization_stage(), "sp_size": engine.sequence_parallel_size}
    engine.destroy()
    return facts | {"losses": losses, "grads": grads, "shapes": shapes, "lora": info}


def compare(grads: dict, ref: dict) -> dict:
    err = {n: ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in ref.items()}
    return {
        "grad_rel_err_max": max(err.values()),
        "grad_rel_err_worst": max(err, key=err.get),
        "grad_names": sorted(grads) == sorted(ref),
        "adapter_tensors": len(ref),
        "zero_grads": [n for n, g in ref.items() if not g.abs().max() > 0],
    }


def greedy_rows(config) -> dict:
    """Untrained tiny Llama over the byte tokenizer: greedy answers to held-out questions, one prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsrecipes.chat import chat_template, render_chat
    from dsrecipes.sft import exact_match, generated
    from dsrecipes.train.data import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = chat_template(tok)
    # initializer_range 0.2: an untrained model at the default 0.02 mostly echoes its last token, whatever it attends
    cfg = type(config).from_dict({**config.to_dict(), "vocab_size": len(tok), "initializer_range": 0.2})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    qs = exact_match.questions(generated.generated_chat(16, 1234, 7))
    prompts = [tok(render_chat(tok, q[0]), add_special_tokens=False)["input_ids"] for q in qs]
    return {"model": model, "prompts": prompts, "pad": tok.pad_token_id}


def answers(g: dict, equal_lengths: bool, alone: bool = False) -> tuple[list[list[int]], list]:
    """Every prompt's greedy answer and its first next-token logits, in exact_match's batches (or each alone)."""
    import torch

    from dsrecipes.sft import exact_match

    lengths = [len(p) for p in g["prompts"]]
    if alone:
        order = [[i] for i in range(len(lengths))]
    else:
        order = exact_match.question_batches(lengths, 0, 1, 8, equal_lengths)
    out, logits = [None] * len(lengths), [None] * len(lengths)
    for idx in order:
        prompts = [g["prompts"][i] for i in idx]
        for i, a in zip(idx, exact_match.greedy(g["model"], prompts, g["pad"], 6, "cpu")):
            out[i] = a
        width = max(len(p) for p in prompts)  # greedy's first step, as it pads
        ids = torch.tensor([[g["pad"]] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            last = g["model"](input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for i, row in zip(idx, last.logits[:, -1]):
            logits[i] = row
    return out, logits


def worker(out_path: str) -> None:
    import datetime
    import gc

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoConfig, AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, LLAMA))
    config.vocab_size = VOCAB
    state = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").state_dict()  # same seed per rank
    data = batches()
    model, _ = lora_model(config, state, None, lora_args(1))
    g = torch.Generator().manual_seed(5)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n in adapters:
        if "lora_B" in n:  # peft's 0: the adapters' product starts non-zero, so lora_A gets a gradient too
            adapters[n] = 0.05 * torch.randn(adapters[n].shape, generator=g)
    t0 = time.time()
    ref_losses, ref_grads = reference(config, state, adapters, data, "none")  # before Ulysses replaces sdpa
    tiled_losses, tiled_grads = reference(config, state, adapters, data, "loss")
    rows = [
        {
            "cell": "lora-sp1-tiled_loss",
            "losses": tiled_losses,
            "ref_losses": ref_losses,
            **compare(tiled_grads, ref_grads),
            "seconds": round(time.time() - t0, 2),
        }
    ]
    em = greedy_rows(config)
    alone = answers(em, False, alone=True)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=fresh_model(config, state),
        core_attn_implementation="sdpa",
        sequence_parallel_size=2,
        micro_batch_size=2,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
    for name, (zero, tiling) in LORA_CELLS.items():
        t = time.time()
        row = {"cell": name, "zero": zero, "tiling": tiling, "ref_losses": ref_losses}
        try:
            got = run_lora_cell(zero, tiling, config, state, adapters, data, rank, mpu)
        except Exception as exc:  # recorded per cell; the next cell runs (both ranks fail alike)
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
        else:
            row |= {k: got[k] for k in ("losses", "zero_stage", "sp_size", "shapes", "lora")}
            row |= compare(got["grads"], ref_grads)
        row["seconds"] = round(time.time() - t, 2)
        rows.append(row)
        gc.collect()
        dist.barrier()
    (padded, padded_logits), (equal, equal_logits) = answers(em, False), answers(em, True)
    lengths = [len(p) for p in em["prompts"]]
    rows.append(
        {
            "cell": "greedy-under-ulysses",
            "questions": len(alone[0]),
            "distinct_lengths": len(set(lengths)),
            "padded_differ": sum(a != b for a, b in zip(padded, alone[0])),
            "equal_lengths_differ": sum(a != b for a, b in zip(equal, alone[0])),
            "padded_logit_diff": max((a - b).abs().max().item() for a, b in zip(padded_logits, alone[1])),
            "equal_lengths_logit_diff": max((a - b).abs().max().item() for a, b in zip(equal_logits, alone[1])),
        }
    )
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh, indent=1)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "src"))
    worker(sys.argv[1])
