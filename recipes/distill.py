"""Knowledge distillation: a student with fewer layers learns from a frozen teacher (Hinton KD + CE + cosine).

Run:
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        recipes/distill.py --config configs/recipes/distill_tiny_4to2.yaml [--key value ...]
    (make distill does exactly this; the teacher is a train_lm final/ dir, e.g. from make train)

Produces, in output_dir: metrics.jsonl (per logged step: phase, loss, kd, ce, cos, lr, tokens/s), summary.json
(teacher, distilled student and from-scratch student eval loss/perplexity on the same eval set, sizes, layer
map, MFU and step-time breakdown), tensorboard/, checkpoints/ (both phases; --resume_from latest continues exactly,
SIGUSR1/SIGTERM checkpoint and stop), final/ (the distilled student, a Hugging Face directory) and, with
scratch_baseline, scratch_final/. The student takes the training keys of train_lm: ZeRO 0-3, 8-bit optimizers,
freeze_*, gradient_checkpointing (dsrecipes.train.loop, dsrecipes.distill.phases).
"""

import os
import sys
import time

import torch
from accelerate.utils import set_seed

from dsrecipes.config import check
from dsrecipes.config.args import recipe_main
from dsrecipes.config.errors import ConfigError
from dsrecipes.distill.distillation import make_distill_accelerator
from dsrecipes.distill.phases import (
    StudentTraining,
    build_teacher_and_student,
    check_teacher_tokenizer,
    distill_summary,
    fresh_student,
    phase_result,
    sizes,
)
from dsrecipes.memory import measure
from dsrecipes.parallel import tensor
from dsrecipes.train.accelerator import evaluate_lm, fill_deepspeed_from_recipe, run_facts
from dsrecipes.train.checkpoints import StopFlag, export_final
from dsrecipes.train.data import build_lm_datasets, load_tokenizer
from dsrecipes.train.loop import Session


@recipe_main("distill")  # parses YAML + CLI into args; a ConfigError is one line, exit 2
def main(args, where):
    # ------------------------------------------------------------------ parse and check
    if args.model_name_or_path:
        raise ConfigError(
            where,
            "model_name_or_path",
            "not used by distill.py",
            "remove it (the student is built from teacher_name_or_path)",
        )
    stop = StopFlag()  # SIGUSR1/SIGTERM: checkpoint at the next step boundary, then exit
    accelerator = make_distill_accelerator(args)
    check.check_run(accelerator, args, where)
    fill_deepspeed_from_recipe(accelerator, args)
    set_seed(args.seed)
    t_start = time.time()
    session = Session(accelerator, args, stop, project="distill", where=where)  # checkpoints, resume, log

    # ------------------------------------------------------------------ data, teacher and student
    teacher, student, mapping = build_teacher_and_student(args, accelerator)
    tensor.check_model(student, accelerator, where)  # AutoTP shards the student: what it cannot shard, in one line
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.teacher_name_or_path)
    check_teacher_tokenizer(tokenizer, teacher, where)
    with accelerator.main_process_first():
        train_ds, eval_ds, data_info = build_lm_datasets(args, tokenizer)
    info = sizes(teacher, student, mapping, args)
    accelerator.print(
        f"teacher {info['teacher_layers']} layers ({info['teacher_params']:,} params) -> student "
        f"{info['student_layers']} layers ({info['student_params']:,}), init {args.student_init}"
        + (f" from teacher blocks {mapping}" if info["layer_map"] else "")
    )
    train = StudentTraining(session, args, train_ds, eval_ds)

    # ------------------------------------------------------------------ distill, then evaluate the teacher
    loop = None
    if session.phase == "scratch":  # resumed after the distill phase had finished: its results are in the state
        if not args.scratch_baseline:
            raise ConfigError(where, "scratch_baseline", "the checkpoint is in the scratch phase", "set it true")
        done = session.state["distilled"]
    else:
        loop, model, engine, eval_dl = train.phase("distill", student, teacher=teacher)
        done = {"student": phase_result(loop), "teacher_eval": None, "final_dir": None}
        if not loop.preempted:
            done["final_dir"] = export_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "final"))
            done["teacher_eval"] = evaluate_lm(engine, eval_dl, accelerator, args.max_eval_batches)
            done["teacher_param_bytes_per_rank"] = measure.measure(engine, None, accelerator)["param_bytes"]
        facts = run_facts(accelerator, args, model)
        del model, engine
        accelerator.free_memory()  # drops the student's (and a ZeRO-3 teacher's) engine

    # ------------------------------------------------------------------ the same student from scratch, same steps
    scratch = None
    if args.scratch_baseline and not (loop is not None and loop.preempted):
        fresh = fresh_student(teacher, args, accelerator)
        set_seed(args.seed)
        loop, model, _, _ = train.phase("scratch", fresh, step_offset=args.max_steps, extra_state={"distilled": done})
        scratch = phase_result(loop)
        if not loop.preempted:
            export_final(accelerator, model, tokenizer, os.path.join(args.output_dir, "scratch_final"))
        facts = run_facts(accelerator, args, model)

    # ------------------------------------------------------------------ summary
    summary = distill_summary(args, info, done, scratch, loop.preempted)
    summary.update(facts, unigram_entropy=data_info["unigram_entropy"], entropy_rate=data_info["entropy_rate"])
    summary.update(resumed_from=session.resume_path)
    summary["wall_time_s"] = time.time() - t_start
    session.log.summary(summary)
    accelerator.end_training()
    if accelerator.is_main_process and loop.preempted:
        print(f"preempted in the {loop.phase} phase at step {loop.step}; resume with --resume_from latest")
    elif accelerator.is_main_process:
        print(
            f"eval loss: teacher {done['teacher_eval']:.3f}, distilled student {done['student']['eval_loss']:.3f}"
            + (f", scratch student {scratch['eval_loss']:.3f}" if scratch else "")
            + f"; quality (teacher ppl / student ppl) {summary['quality_vs_teacher']:.3f}; student in "
            f"{done['final_dir']}; MFU {summary['mfu'] or 0:.2%}"
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
