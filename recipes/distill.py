"""Knowledge distillation: a student with fewer layers learns from a frozen teacher (Hinton KD + CE + cosine).

Run:
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        recipes/distill.py --config configs/recipes/distill_tiny_4to2.yaml [--key value ...]
    (make distill does exactly this; the teacher is a train_lm final/ dir, e.g. from make train)

Produces, in output_dir: metrics.jsonl (per logged step: phase, loss, kd, ce, cos, lr, tokens/s), summary.json
(teacher, distilled student and from-scratch student eval loss/perplexity on the same eval set, sizes, layer
map), tensorboard/, final/ (the distilled student, a Hugging Face directory) and, with scratch_baseline,
scratch_final/. No mid-run checkpoints: a distillation run is short; rerun it if it is interrupted.
"""

import os
import sys
import time

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dsrecipes.config import check
from dsrecipes.config.args import RECIPES, parse_args
from dsrecipes.config.errors import ConfigError, exit_on_config_error
from dsrecipes.distill.distillation import (
    distillation_loss,
    load_teacher,
    make_distill_accelerator,
    prepare_teacher,
    student_from_teacher,
    teacher_forward,
)
from dsrecipes.freezing.freezer import Freezer
from dsrecipes.memory import activation_checkpointing, measure
from dsrecipes.train.accelerator import (
    evaluate_lm,
    fill_deepspeed_from_recipe,
    make_dataloaders,
    make_scheduler,
    mean_across_ranks,
    zero_stage,
)
from dsrecipes.train.checkpoints import export_final
from dsrecipes.train.data import build_lm_datasets, load_tokenizer
from dsrecipes.train.models import count_parameters
from dsrecipes.train.optimizers import build_optimizer
from dsrecipes.train.runlog import RunLog, perplexity


def setup_student(student, args, accelerator):
    """Activation checkpointing, freezing (freeze_* keys apply to the student), optimizer and LR schedule."""
    activation_checkpointing.apply_activation_checkpointing(student, args, accelerator)
    freezer = Freezer(student, args, accelerator)
    optimizer = build_optimizer(student, args)
    return freezer, optimizer, make_scheduler(optimizer, args)


def train_student(phase, model, optimizer, scheduler, freezer, args, accelerator, train_dl, eval_dl, log, teacher=None):
    """max_steps optimizer steps: the distillation loss with a teacher, plain CE without. Returns (model, stats)."""
    want_hidden = teacher is not None and args.alpha_cos > 0
    model.train()
    step, epoch, tokens, micro, t0 = 0, 0, 0, [], time.time()
    bar = tqdm(total=args.max_steps, desc=phase, disable=not accelerator.is_local_main_process)
    while step < args.max_steps:
        train_dl.set_epoch(epoch)
        for batch in train_dl:
            with accelerator.accumulate(model):
                if teacher is not None:
                    t_logits, t_hidden = teacher_forward(teacher, batch, want_hidden)
                    out = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch.get("attention_mask"),
                        output_hidden_states=want_hidden,
                    )
                    loss, terms = distillation_loss(
                        out.logits,
                        t_logits,
                        batch["labels"],
                        args.temperature,
                        args.alpha_kd,
                        args.alpha_ce,
                        args.alpha_cos,
                        out.hidden_states[-1] if want_hidden else None,
                        t_hidden,
                    )
                else:
                    loss = model(**batch).loss
                    terms = {"ce": loss.detach().item(), "loss": loss.detach().item()}
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            micro.append(terms)
            tokens += batch["input_ids"].numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer step done
            scheduler.step()
            step += 1
            bar.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                rec = {
                    k: mean_across_ranks(accelerator, torch.tensor(sum(m[k] for m in micro) / len(micro)))
                    for k in micro[0]
                }  # each loss term, averaged over micro-batches and ranks
                rec.update(
                    phase=phase,
                    step=step,
                    lr=scheduler.get_last_lr()[0],
                    tokens_per_s=tokens / max(time.time() - t0, 1e-9),
                )
                log.write(rec)
                accelerator.log({f"{phase}/{k}": v for k, v in rec.items() if isinstance(v, float)}, step=step)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            micro = []
            if step % args.eval_steps == 0 and step < args.max_steps:
                log.write(
                    {
                        "phase": phase,
                        "step": step,
                        "eval_loss": evaluate_lm(model, eval_dl, accelerator, args.max_eval_batches),
                    }
                )
            model, optimizer, scheduler = freezer.after_step(step, model, optimizer, scheduler)
            if step >= args.max_steps:
                break
        epoch += 1
    bar.close()
    train_time = time.time() - t0
    eval_loss = evaluate_lm(model, eval_dl, accelerator, args.max_eval_batches)
    log.write({"phase": phase, "step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)})
    return model, {
        "eval_loss": eval_loss,
        "eval_ppl": perplexity(eval_loss),
        "train_time_s": train_time,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "freezing": freezer.report(),
    }


@exit_on_config_error
def main(argv=None):
    # ------------------------------------------------------------------ parse and check
    args, config_path = parse_args(RECIPES["distill"], argv)
    for key in ("model_name_or_path", "resume_from"):
        if getattr(args, key):
            raise ConfigError(
                config_path or "<cli>",
                key,
                "not used by distill.py",
                "remove it (the student is built from teacher_name_or_path; distillation runs are not resumed)",
            )
    accelerator = make_distill_accelerator(args)
    check.check_run(accelerator, args, config_path)
    fill_deepspeed_from_recipe(accelerator, args)
    set_seed(args.seed)
    t_start = time.time()

    # ------------------------------------------------------------------ data, teacher and student
    teacher = load_teacher(args.teacher_name_or_path)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.teacher_name_or_path)
    if len(tokenizer) > teacher.config.vocab_size:
        raise ConfigError(
            config_path or "<cli>",
            "tokenizer_name_or_path",
            f"{len(tokenizer)} tokens but the teacher has {teacher.config.vocab_size}",
            "use the teacher's tokenizer (unset the key)",
        )
    with accelerator.main_process_first():
        train_ds, eval_ds, data_info = build_lm_datasets(args, tokenizer)
    student, mapping = student_from_teacher(teacher, args.student_num_layers, args.student_init, seed=args.seed)
    train_dl, eval_dl = make_dataloaders(train_ds, eval_ds, args)
    teacher_raw = teacher
    log = RunLog(args.output_dir, enabled=accelerator.is_main_process)
    if args.report_to != "none":
        accelerator.init_trackers(
            "distill", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )
    sizes = {
        "teacher_params": count_parameters(teacher),
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_params": count_parameters(student),
        "student_layers": student.config.num_hidden_layers,
        "layer_map": mapping if args.student_init == "teacher_layers" else None,
    }
    accelerator.print(
        f"teacher {sizes['teacher_layers']} layers ({sizes['teacher_params']:,} params) -> student "
        f"{sizes['student_layers']} layers ({sizes['student_params']:,}), init {args.student_init}"
        + (f" from teacher blocks {mapping}" if sizes["layer_map"] else "")
    )

    # ------------------------------------------------------------------ distill, then evaluate the teacher
    freezer, optimizer, scheduler = setup_student(student, args, accelerator)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        student, optimizer, train_dl, eval_dl, scheduler
    )
    teacher = prepare_teacher(teacher, args, accelerator)  # after the student: backward() follows the first engine
    model, distilled = train_student(
        "distill", model, optimizer, scheduler, freezer, args, accelerator, train_dl, eval_dl, log, teacher=teacher
    )
    final_dir = export_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "final"))
    teacher_eval = evaluate_lm(teacher, eval_dl, accelerator, args.max_eval_batches)
    sizes["teacher_param_bytes_per_rank"] = measure.measure(teacher, None, accelerator)["param_bytes"]  # ZeRO-3: 1/N

    # ------------------------------------------------------------------ the same student from scratch, same steps
    scratch = None
    if args.scratch_baseline:
        del model, optimizer, scheduler
        accelerator.free_memory()  # drops the student's engine; the same prepared dataloaders are reused
        accelerator._dataloaders.extend([train_dl, eval_dl])
        fresh, _ = student_from_teacher(teacher_raw, args.student_num_layers, "scratch", seed=args.seed)
        set_seed(args.seed)
        freezer, optimizer, scheduler = setup_student(fresh, args, accelerator)
        model, optimizer, scheduler = accelerator.prepare(fresh, optimizer, scheduler)
        model, scratch = train_student(
            "scratch", model, optimizer, scheduler, freezer, args, accelerator, train_dl, eval_dl, log
        )
        export_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "scratch_final"))

    # ------------------------------------------------------------------ summary
    summary = {
        "recipe": "distill",
        "status": "completed",
        "steps": args.max_steps,
        **sizes,
        "student_init": args.student_init,
        "temperature": args.temperature,
        "weights": {"kd": args.alpha_kd, "ce": args.alpha_ce, "cos": args.alpha_cos},
        "teacher_engine": args.teacher_engine,
        "teacher_dtype": args.teacher_dtype,
        "teacher": {"eval_loss": teacher_eval, "eval_ppl": perplexity(teacher_eval)},
        "student": distilled,
        "scratch": scratch,
        "quality_vs_teacher": perplexity(teacher_eval) / distilled["eval_ppl"],
        "world_size": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        "unigram_entropy": data_info["unigram_entropy"],
        "final_dir": final_dir,
        "wall_time_s": time.time() - t_start,
    }
    log.summary(summary)
    accelerator.end_training()
    if accelerator.is_main_process:
        line = (
            f"eval loss: teacher {teacher_eval:.3f}, distilled student {distilled['eval_loss']:.3f}"
            + (f", scratch student {scratch['eval_loss']:.3f}" if scratch else "")
            + f"; quality (teacher ppl / student ppl) {summary['quality_vs_teacher']:.3f}; student in {final_dir}"
        )
        print(line)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
