"""Chat fine-tuning (SFT): the loss on assistant tokens only, optional packing, exact match before and after.

Run:
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        recipes/sft.py --config configs/recipes/sft_tiny.yaml [--key value ...]
    (make sft does exactly this, after `make train` made outputs/train_tiny_zero2/final)

train_lm's recipe with another data path and loss hook: chat JSONL (or the generated chat set) rendered with the
chat template, labels -100 outside assistant turns (dsrecipes.sft.chat_data), rows packed with per-conversation
position ids when packing is true (dsrecipes.sft.packing), and greedy exact match on the held-out conversations
before and after (dsrecipes.sft.exact_match). Starts from model_name_or_path (e.g. make train's final/), or from
model_config. ZeRO stages, activation checkpointing, freezing and LoRA (lora_r > 0) go through train_lm's helpers,
called in train_lm's order. Produces what train_lm does (metrics.jsonl, summary.json, checkpoints/, final/ with
the chat template in its tokenizer) plus, in summary.json, exact_match_before/after and non-padding tokens per second.
"""

import os
import sys
import time

import torch
from accelerate.utils import set_seed

from dsrecipes.chat import chat_template
from dsrecipes.config import check
from dsrecipes.config.args import recipe_main
from dsrecipes.freezing.freezer import Freezer
from dsrecipes.memory import activation_checkpointing, measure
from dsrecipes.parallel import sequence, tensor
from dsrecipes.sft.data import TokenCounter, build_sft_data, make_sft_dataloaders
from dsrecipes.sft.exact_match import exact_match
from dsrecipes.sft.packing import check_packing
from dsrecipes.train import lora
from dsrecipes.train.accelerator import fill_deepspeed_from_recipe, make_accelerator, make_scheduler, run_facts
from dsrecipes.train.checkpoints import StopFlag, export_run
from dsrecipes.train.data import load_tokenizer
from dsrecipes.train.loop import Loop, Session
from dsrecipes.train.models import build_causal_lm
from dsrecipes.train.optimizers import build_optimizer
from dsrecipes.train.throughput import FlopCounter


@recipe_main("sft")  # parses YAML + CLI into args; a ConfigError is one line, exit 2
def main(args, where):
    # ------------------------------------------------------------------ parse and check
    stop = StopFlag()
    accelerator = make_accelerator(args, project="sft")
    check.check_run(accelerator, args, where)
    sequence.check_resume(args, where)  # an SP run resumes on its own layout only (DeepSpeed #8226)
    fill_deepspeed_from_recipe(accelerator, args)
    set_seed(args.seed)
    t_start = time.time()
    session = Session(accelerator, args, stop, project="sft", where=where)

    # ------------------------------------------------------------------ data and model
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
    tokenizer.chat_template = chat_template(tokenizer)  # the model's own, else the default; exported with final/
    with accelerator.main_process_first():
        data = build_sft_data(args, tokenizer, where)
    if data.info["dropped_too_long"] and accelerator.is_main_process:
        print(
            f"note: dropped {data.info['dropped_too_long']} conversations over block_size {args.block_size} tokens "
            f"(first: {data.info['first_dropped']}); raise block_size to keep them",
            flush=True,
        )
    model = build_causal_lm(args, tokenizer, accelerator=accelerator)
    leak = check_packing(model, where) if args.packing else None  # refuses a model that attends across them
    sp_info = sequence.prepare_model(model, args, where)  # sequence_parallel_size, tiled_mlp, tiled_loss
    ckpt_info = activation_checkpointing.apply_activation_checkpointing(model, args, accelerator)
    freezer = Freezer(model, args, accelerator, resumed=session.resumed_freezer())
    tensor.check_model(model, accelerator, where)  # AutoTP: what it cannot shard, in one line
    model, lora_info = lora.apply_lora(model, args, where)  # lora_r > 0: frozen base + peft adapters (as train_lm)
    optimizer = build_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    train_dl, eval_dl = make_sft_dataloaders(data, args, tokenizer)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    train_dl, eval_dl = sequence.loaders(accelerator, train_dl, eval_dl, args)  # SP: each rank a sequence shard
    if lora_info:
        session.ckpt.trainable_only(accelerator.unwrap_model(model))  # the adapter and its optimizer state only
    probe = measure.StepProbe(model, optimizer)

    # ------------------------------------------------------------------ exact match before, train, exact match after
    em_kw = {"batch_size": args.exact_match_batch_size, "max_new_tokens": args.exact_match_max_new_tokens}
    em_kw["equal_lengths"] = sequence.sp_size(args) > 1  # Ulysses drops the left-padding mask (sft/exact_match.py)
    # the starting model: a resumed run loads its checkpoint inside loop.run, so `before` is always the start's
    before = exact_match(model, tokenizer, data.heldout, accelerator, **em_kw)
    counter = TokenCounter()
    loop = Loop(
        session, args, freezer=freezer, flops=FlopCounter(train=[model]), extra_state=sequence.checkpoint_facts(args)
    )
    compute_loss = sequence.loss_hook(args, counter.loss)  # SP / tiling: the loss over the whole split sequence
    model, optimizer, _ = loop.run(model, optimizer, scheduler, train_dl, eval_dl, compute_loss, probe=probe)
    after = exact_match(model, tokenizer, data.heldout, accelerator, **em_kw)
    real, padding = counter.totals(accelerator)

    # ------------------------------------------------------------------ export and summary
    final_dir = None
    if not loop.preempted and args.export_final:
        final_dir = export_run(accelerator, model, tokenizer, args)  # LoRA: merged final/ and/or final_adapter/
    summary = {
        "recipe": "sft",
        **loop.summary(),
        **run_facts(accelerator, args, model),
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "exact_match": {"before": before, "after": after},
        "packing": args.packing,
        "packing_leak": leak,
        "real_tokens": real,
        "padding_tokens": padding,
        "padding_fraction": padding / max(real + padding, 1),
        "real_tokens_per_s": real / max(loop.train_time, 1e-9),
        **data.info,
        "wall_time_s": time.time() - t_start,
        "final_dir": final_dir,
        "memory": measure.measure(model, optimizer, accelerator, probe),
        "activation_checkpointing": ckpt_info,
        "lora": lora_info,
        "sequence_parallel": sp_info,
    }
    session.log.summary(summary)
    accelerator.end_training()
    if accelerator.is_main_process:
        ev = "n/a" if loop.eval_loss is None else f"{loop.eval_loss:.3f}"
        what = f"preempted at step {loop.step}" if loop.preempted else f"fine-tuned {loop.step} steps"
        print(
            f"{what}: loss {loop.first_loss:.3f} -> {loop.train_loss:.3f}, held-out loss {ev}, exact match "
            f"{before['exact_match']:.1%} -> {after['exact_match']:.1%} of {after['turns']} held-out answers, "
            f"{summary['real_tokens_per_s']:.0f} non-padding tokens/s ({'packed' if args.packing else 'padded'}, "
            f"{summary['padding_fraction']:.1%} padding); outputs in {os.path.abspath(args.output_dir)}"
            + (f"; model in {final_dir}" if final_dir else "")
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
