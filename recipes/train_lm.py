"""Base recipe: train a causal LM with accelerate + DeepSpeed (ZeRO 0-3, offload), resumable and exported.

Run:
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        recipes/train_lm.py --config configs/recipes/train_tiny_zero2.yaml [--key value ...]
    (make train does exactly this; --deepspeed_config_file configs/deepspeed/zero3.json picks another stage)

Produces, in output_dir: metrics.jsonl (one line per logged step), summary.json (losses, MFU, step-time
breakdown, memory), tensorboard/, checkpoints/step_*/ (+ latest), and final/ (a Hugging Face model directory,
ZeRO-3 shards consolidated). The loop itself (accumulation, clipping, eval, freezing, checkpoints, preemption on
SIGUSR1/SIGTERM, exact resume with --resume_from latest) is dsrecipes.train.loop.
"""

import os
import sys
import time

import torch
from accelerate.utils import set_seed

from dsrecipes.config import check
from dsrecipes.config.args import recipe_main
from dsrecipes.freezing.freezer import Freezer
from dsrecipes.memory import activation_checkpointing, measure
from dsrecipes.parallel import sequence, tensor
from dsrecipes.train import lora
from dsrecipes.train.accelerator import (
    fill_deepspeed_from_recipe,
    make_accelerator,
    make_dataloaders,
    make_scheduler,
    run_facts,
)
from dsrecipes.train.checkpoints import StopFlag, export_run
from dsrecipes.train.data import build_lm_datasets, load_tokenizer
from dsrecipes.train.loop import Loop, Session, lm_loss
from dsrecipes.train.models import build_causal_lm
from dsrecipes.train.optimizers import build_optimizer
from dsrecipes.train.throughput import FlopCounter


@recipe_main("train_lm")  # parses YAML + CLI into args; a ConfigError is one line, exit 2
def main(args, where):
    # ------------------------------------------------------------------ parse and check
    stop = StopFlag()  # SIGUSR1/SIGTERM: checkpoint at the next step boundary, then exit
    accelerator = make_accelerator(args, project="train_lm")
    check.check_run(accelerator, args, where)
    sequence.check_resume(args, where)  # an SP run resumes on its own layout only (DeepSpeed #8226)
    fill_deepspeed_from_recipe(accelerator, args)
    set_seed(args.seed)
    t_start = time.time()
    session = Session(accelerator, args, stop, project="train_lm", where=where)  # checkpoints, resume, log

    # ------------------------------------------------------------------ data and model
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
    with accelerator.main_process_first():
        train_ds, eval_ds, data_info = build_lm_datasets(args, tokenizer)
    model = build_causal_lm(args, tokenizer, accelerator=accelerator)
    sp_info = sequence.prepare_model(model, args, where)  # sequence_parallel_size, tiled_mlp, tiled_loss
    ckpt_info = activation_checkpointing.apply_activation_checkpointing(model, args, accelerator)
    freezer = Freezer(model, args, accelerator, resumed=session.resumed_freezer())  # freeze_* keys, prefix cache
    tensor.check_model(model, accelerator, where)  # AutoTP (tensor_parallel.autotp_size): what it cannot shard
    model, lora_info = lora.apply_lora(model, args, where)  # lora_r > 0: frozen base + peft adapters (QLoRA: nf4)
    optimizer = build_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    train_dl, eval_dl = make_dataloaders(train_ds, eval_ds, args)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    train_dl, eval_dl = sequence.loaders(accelerator, train_dl, eval_dl, args)  # SP: each rank a sequence shard
    if lora_info:
        session.ckpt.trainable_only(accelerator.unwrap_model(model))  # the adapter and its optimizer state only
    probe = measure.StepProbe(model, optimizer)  # memory: activation bytes of the first micro-batch, states at its step

    # ------------------------------------------------------------------ train (resumes from the checkpoint if any)
    loop = Loop(
        session, args, freezer=freezer, flops=FlopCounter(train=[model]), extra_state=sequence.checkpoint_facts(args)
    )
    compute_loss = sequence.loss_hook(args, lm_loss)  # SP / tiling: the loss over the whole split sequence
    model, optimizer, _ = loop.run(model, optimizer, scheduler, train_dl, eval_dl, compute_loss, probe=probe)

    # ------------------------------------------------------------------ export and summary
    final_dir = None
    if not loop.preempted and args.export_final:
        final_dir = export_run(accelerator, model, tokenizer, args)  # LoRA: merged final/ and/or final_adapter/
    summary = {
        "recipe": "train_lm",
        **loop.summary(),
        **run_facts(accelerator, args, model),
        "unigram_entropy": data_info["unigram_entropy"],
        "entropy_rate": data_info["entropy_rate"],  # the generated language's optimum (None for other data)
        "train_blocks": data_info["train_blocks"],
        "wall_time_s": time.time() - t_start,
        "final_dir": final_dir,
        "memory": measure.measure(model, optimizer, accelerator, probe),
        "activation_checkpointing": ckpt_info,
        "lora": lora_info,
        "sequence_parallel": sp_info,
        "tensor_parallel": tensor.sharding(accelerator.unwrap_model(model)),  # AutoTP: sharded vs replicated bytes
    }
    session.log.summary(summary)
    accelerator.end_training()
    step, first, last, ev = loop.step, loop.first_loss, loop.train_loss, loop.eval_loss
    if accelerator.is_main_process:
        what = f"trained {step} steps"
        if loop.preempted:
            what = f"preempted at step {step}; resume with --resume_from latest"
        ev = "n/a" if ev is None else f"{ev:.3f}"  # None when preempted before the first eval
        mfu = "n/a" if summary["mfu"] is None else f"{summary['mfu']:.2%}"
        print(
            f"{what}: loss {first:.3f} -> {last:.3f}, eval loss {ev} (unigram entropy "
            f"{data_info['unigram_entropy']:.3f}{_optimum(data_info)}), MFU {mfu}; outputs in "
            f"{os.path.abspath(args.output_dir)}" + (f"; model in {final_dir}" if final_dir else "")
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def _optimum(info) -> str:
    return "" if info["entropy_rate"] is None else f", entropy rate {info['entropy_rate']:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
