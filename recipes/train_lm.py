"""Base recipe: train a causal LM with accelerate + DeepSpeed (ZeRO 0-3, offload), resumable and exported.

Run:
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        recipes/train_lm.py --config configs/recipes/train_tiny_zero2.yaml [--key value ...]
    (make train does exactly this; --deepspeed_config_file configs/deepspeed/zero3.json picks another stage)

Produces, in output_dir: metrics.jsonl (one line per logged step), summary.json, tensorboard/,
checkpoints/step_*/ (+ latest), and final/ (a Hugging Face model directory, ZeRO-3 shards consolidated).
"""

import os
import sys
import time

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dsrecipes.config import check
from dsrecipes.config.args import RECIPES, parse_args
from dsrecipes.config.errors import exit_on_config_error
from dsrecipes.freezing.freezer import Freezer
from dsrecipes.memory import activation_checkpointing, measure
from dsrecipes.train.accelerator import (
    evaluate_lm,
    fill_deepspeed_from_recipe,
    make_accelerator,
    make_dataloaders,
    make_scheduler,
    mean_across_ranks,
    zero_stage,
)
from dsrecipes.train.checkpoints import Checkpoints, StopFlag, export_final
from dsrecipes.train.data import build_lm_datasets, load_tokenizer
from dsrecipes.train.models import build_causal_lm, count_parameters
from dsrecipes.train.optimizers import build_optimizer
from dsrecipes.train.runlog import RunLog, perplexity


@exit_on_config_error
def main(argv=None):
    # ------------------------------------------------------------------ parse and check
    args, config_path = parse_args(RECIPES["train_lm"], argv)
    stop = StopFlag()  # SIGUSR1/SIGTERM: checkpoint at the next step boundary, then exit
    accelerator = make_accelerator(args, project="train_lm")
    check.check_run(accelerator, args, config_path)
    fill_deepspeed_from_recipe(accelerator, args)
    set_seed(args.seed)
    t_start = time.time()

    # ------------------------------------------------------------------ data and model
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
    with accelerator.main_process_first():
        train_ds, eval_ds, data_info = build_lm_datasets(args, tokenizer)
    model = build_causal_lm(args, tokenizer, accelerator=accelerator)
    ckpt_info = activation_checkpointing.apply_activation_checkpointing(
        model, args, accelerator
    )  # none|full|every_k|deepspeed
    freezer = Freezer(model, args, accelerator)  # static + progressive freezing, prefix cache (freeze_* keys)
    optimizer = build_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    train_dl, eval_dl = make_dataloaders(train_ds, eval_ds, args)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    probe = measure.StepProbe(model, optimizer)  # memory: activation bytes of the first micro-batch, states at its step
    if args.report_to != "none":
        accelerator.init_trackers(
            "train_lm", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    # ------------------------------------------------------------------ resume
    ckpt = Checkpoints(accelerator, args.output_dir, keep_last=args.save_total_limit)
    resume_path = ckpt.resolve(args.resume_from)
    state = ckpt.load(resume_path) if resume_path else {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    log = RunLog(args.output_dir, enabled=accelerator.is_main_process, resume_step=step)
    if resume_path:
        accelerator.print(f"resumed from {resume_path} at step {step}")
    steps_per_epoch = len(train_dl) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise check.ConfigError(
            config_path,
            "per_device_train_batch_size",
            "one epoch has fewer micro-batches than gradient_accumulation_steps",
            "use more data or smaller batches",
        )

    # ------------------------------------------------------------------ train
    model.train()
    bar = tqdm(total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    micro_losses, tokens_seen, t_loop, first_loss, preempted = [], 0, time.time(), state.get("first_loss"), False
    data_sum = 0
    eval_loss, train_loss = state.get("eval_loss"), state.get("last_loss")
    while step < args.max_steps and not preempted:
        train_dl.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dl, batch_in_epoch) if batch_in_epoch else train_dl
        for batch in batches:
            with accelerator.accumulate(model), probe.first_micro_batch():  # probe: no-op after the first micro-batch
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            micro_losses.append(loss.detach().float())
            data_sum += int(batch["input_ids"].sum())  # fingerprint of this rank's data order
            batch_in_epoch += 1
            tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step done
            scheduler.step()
            step += 1
            bar.update(1)
            train_loss = mean_across_ranks(accelerator, torch.stack(micro_losses).mean())
            micro_losses = []
            first_loss = train_loss if first_loss is None else first_loss
            if step % args.logging_steps == 0 or step == args.max_steps:
                elapsed = time.time() - t_loop
                # float(): torchao's low-bit AdamW keeps lr as a tensor, which json cannot write
                rec = {
                    "step": step,
                    "loss": train_loss,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "epoch": epoch,
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "data_sum": data_sum,
                }
                log.write(rec)
                data_sum = 0
                accelerator.log({"train/loss": train_loss, "train/lr": rec["lr"]}, step=step)
                bar.set_postfix(loss=f"{train_loss:.3f}")
            if step % args.eval_steps == 0 or step == args.max_steps:
                eval_loss = evaluate_lm(model, eval_dl, accelerator, args.max_eval_batches)
                log.write({"step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)})
                accelerator.log({"eval/loss": eval_loss, "eval/ppl": perplexity(eval_loss)}, step=step)
            model, optimizer, scheduler = freezer.after_step(step, model, optimizer, scheduler)  # rebuilds if it froze
            preempted = stop.requested(accelerator)
            if batch_in_epoch == steps_per_epoch * args.gradient_accumulation_steps:
                epoch, batch_in_epoch = epoch + 1, 0
            done = step >= args.max_steps
            if (args.save_steps and step % args.save_steps == 0) or done or preempted:
                ckpt.save(
                    step,
                    {
                        "step": step,
                        "epoch": epoch,
                        "batch_in_epoch": batch_in_epoch,
                        "first_loss": first_loss,
                        "last_loss": train_loss,
                        "eval_loss": eval_loss,
                        "freezer": freezer.state(),
                    },
                )
            if done or preempted:
                break
            if batch_in_epoch == 0:
                break  # epoch finished: next epoch re-shuffles
    bar.close()
    train_time = time.time() - t_loop

    # ------------------------------------------------------------------ export and summary
    final_dir = None
    if not preempted and args.export_final:
        final_dir = export_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "final"))
    summary = {
        "recipe": "train_lm",
        "status": "preempted" if preempted else "completed",
        "steps": step,
        "first_loss": first_loss,
        "final_loss": train_loss,
        "final_eval_loss": eval_loss,
        "final_eval_ppl": perplexity(eval_loss) if eval_loss is not None else None,
        "unigram_entropy": data_info["unigram_entropy"],
        "train_blocks": data_info["train_blocks"],
        "world_size": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "optimizer": args.optimizer,
        "params": count_parameters(accelerator.unwrap_model(model)),
        "frozen_params": freezer.frozen_params,
        "train_time_s": train_time,
        "wall_time_s": time.time() - t_start,
        "tokens_per_s": tokens_seen / max(train_time, 1e-9),
        "resumed_from": resume_path,
        "final_dir": final_dir,
        "memory": measure.measure(model, optimizer, accelerator, probe),
        "activation_checkpointing": ckpt_info,
        "freezing": freezer.report(),
    }
    log.summary(summary)
    accelerator.end_training()
    if accelerator.is_main_process:
        what = f"preempted at step {step}; resume with --resume_from latest" if preempted else f"trained {step} steps"
        ev = "n/a" if eval_loss is None else f"{eval_loss:.3f}"  # None when preempted before the first eval
        print(
            f"{what}: loss {first_loss:.3f} -> {train_loss:.3f}, eval loss {ev} "
            f"(unigram entropy {data_info['unigram_entropy']:.3f}); outputs in {os.path.abspath(args.output_dir)}"
            + (f"; model in {final_dir}" if final_dir else "")
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
