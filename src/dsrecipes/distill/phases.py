"""The two phases of recipes/distill.py on the shared loop: the student distilled from the teacher, then (with
scratch_baseline) the same student trained from scratch on hard labels for the same steps.

    train = StudentTraining(session, args, train_ds, eval_ds)
    loop, model, engine, eval_dl = train.phase("distill", student, teacher=teacher)   # KL*T^2 + CE + cosine
    loop, model, _, _ = train.phase("scratch", fresh, step_offset=args.max_steps, extra_state={...})   # plain CE

Each phase prepares its own student (activation checkpointing, freezing, optimizer, ZeRO engine) and dataloaders,
and runs dsrecipes.train.loop.Loop under its phase name. Both phases write into one checkpoint directory, the
scratch phase numbering its steps after the distill phase's (step_offset), and the trainer state records the phase
plus whatever a later phase needs from an earlier one (extra_state: the distilled student's results), so
`--resume_from latest` continues from the newest checkpoint whichever phase wrote it.
"""

from __future__ import annotations

from dsrecipes.config.errors import ConfigError
from dsrecipes.distill.distillation import (
    distillation_loss,
    load_teacher,
    prepare_teacher,
    student_from_teacher,
    teacher_forward,
)
from dsrecipes.freezing.freezer import Freezer
from dsrecipes.memory import activation_checkpointing
from dsrecipes.train.accelerator import make_dataloaders, make_scheduler
from dsrecipes.train.loop import Loop
from dsrecipes.train.models import count_parameters, zero3_init_scope
from dsrecipes.train.optimizers import build_optimizer
from dsrecipes.train.runlog import perplexity
from dsrecipes.train.throughput import FlopCounter


def distill_loss_fn(teacher, args):
    """The loop's compute_loss hook for distillation: the teacher's soft targets (and final hidden state when
    alpha_cos > 0) against the student's; logs each term (kd, ce, cos)."""
    want_hidden = args.alpha_cos > 0

    def compute_loss(model, batch):
        t_logits, t_hidden = teacher_forward(teacher, batch, want_hidden)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), output_hidden_states=want_hidden
        )
        s_hidden = out.hidden_states[-1] if want_hidden else None
        loss, terms = distillation_loss(
            out.logits,
            t_logits,
            batch["labels"],
            args.temperature,
            args.alpha_kd,
            args.alpha_ce,
            args.alpha_cos,
            s_hidden,
            t_hidden,
        )
        terms.pop("loss")  # the loop logs the loss itself
        return loss, terms

    return compute_loss


def ce_loss(model, batch):
    """The scratch baseline's hook: hard-label cross-entropy only, logged as ce like the distillation term."""
    loss = model(**batch).loss
    return loss, {"ce": loss.detach().item()}


def check_teacher_tokenizer(tokenizer, teacher, where: str) -> None:
    if len(tokenizer) > teacher.config.vocab_size:
        raise ConfigError(
            where,
            "tokenizer_name_or_path",
            f"{len(tokenizer)} tokens but the teacher has {teacher.config.vocab_size}",
            "use the teacher's tokenizer (unset the key)",
        )


def build_teacher_and_student(args, accelerator, init: str | None = None):
    """(teacher, student, layer map): both built whole, not under deepspeed.zero.Init (which accelerate would switch on
    for a ZeRO-3 student config; the student copies the teacher's weights, and a plain teacher runs unsharded)."""
    with zero3_init_scope(accelerator):
        teacher = load_teacher(args.teacher_name_or_path)
        student, mapping = student_from_teacher(
            teacher, args.student_num_layers, init or args.student_init, seed=args.seed
        )
    return teacher, student, mapping


def fresh_student(teacher, args, accelerator):
    """The scratch baseline: the same student shape, freshly initialised from args.seed."""
    with zero3_init_scope(accelerator):
        return student_from_teacher(teacher, args.student_num_layers, "scratch", seed=args.seed)[0]


def sizes(teacher, student, mapping, args) -> dict:
    return {
        "teacher_params": count_parameters(teacher),
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_params": count_parameters(student),
        "student_layers": student.config.num_hidden_layers,
        "layer_map": mapping if args.student_init == "teacher_layers" else None,
    }


def phase_result(loop) -> dict:
    """A phase's part of summary.json (summary["student"] / summary["scratch"])."""
    out = loop.summary()
    out["eval_loss"], out["eval_ppl"] = out.pop("final_eval_loss"), out.pop("final_eval_ppl")
    return out


class StudentTraining:
    def __init__(self, session, args, train_ds, eval_ds):
        self.session, self.args, self.acc = session, args, session.acc
        self.train_ds, self.eval_ds = train_ds, eval_ds

    def phase(self, name, student, teacher=None, step_offset=0, extra_state=None):
        """Prepare `student` (and the teacher after it: accelerate's backward() follows the first DeepSpeed engine it
        prepared) and train it for max_steps. Returns (loop, prepared model, teacher engine or None, eval_dl)."""
        acc, args = self.acc, self.args
        ckpt_info = activation_checkpointing.apply_activation_checkpointing(student, args, acc)
        freezer = Freezer(student, args, acc, resumed=self.session.resumed_freezer(name))  # freeze_*: the student
        optimizer = build_optimizer(student, args)
        scheduler = make_scheduler(optimizer, args)
        train_dl, eval_dl = make_dataloaders(self.train_ds, self.eval_ds, args)
        model, optimizer, train_dl, eval_dl, scheduler = acc.prepare(student, optimizer, train_dl, eval_dl, scheduler)
        flops = FlopCounter(train=[model], forward=[teacher] if teacher is not None else [])
        engine = prepare_teacher(teacher, args, acc) if teacher is not None else None
        loop = Loop(self.session, args, freezer, flops, phase=name, step_offset=step_offset, extra_state=extra_state)
        loop.facts["activation_checkpointing"] = ckpt_info
        compute_loss = distill_loss_fn(engine, args) if engine is not None else ce_loss
        model, _, _ = loop.run(model, optimizer, scheduler, train_dl, eval_dl, compute_loss)
        return loop, model, engine, eval_dl


def distill_summary(args, info: dict, done: dict, scratch: dict | None, preempted: bool) -> dict:
    """summary.json of recipes/distill.py (the recipe adds the run facts): the teacher, the distilled student and the
    scratch student on the same eval set; the distill phase's MFU and step-time breakdown at the top level."""
    distilled, teacher_eval = done["student"], done["teacher_eval"]
    return {
        "recipe": "distill",
        "status": "preempted" if preempted else "completed",
        "steps": args.max_steps,
        **info,
        "teacher_param_bytes_per_rank": done.get("teacher_param_bytes_per_rank"),
        "student_init": args.student_init,
        "temperature": args.temperature,
        "weights": {"kd": args.alpha_kd, "ce": args.alpha_ce, "cos": args.alpha_cos},
        "teacher_engine": args.teacher_engine,
        "teacher_dtype": args.teacher_dtype,
        "teacher": None if teacher_eval is None else {"eval_loss": teacher_eval, "eval_ppl": perplexity(teacher_eval)},
        "student": distilled,
        "scratch": scratch,
        "quality_vs_teacher": None if teacher_eval is None else perplexity(teacher_eval) / distilled["eval_ppl"],
        **{k: distilled[k] for k in ("mfu", "peak_flops", "step_time_breakdown", "tokens_per_s")},
        "final_dir": done["final_dir"],
    }
