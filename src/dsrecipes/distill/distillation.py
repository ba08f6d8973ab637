"""Knowledge distillation (book ch. 8): the loss, the student built from the teacher, and the teacher's engine.

    loss, terms = distillation_loss(s_logits, t_logits, labels, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5,
                                    alpha_cos=0.0, s_hidden=None, t_hidden=None)
    student = student_from_teacher(teacher, num_layers=4, init="teacher_layers")   # DistilBERT-style
    accelerator = make_distill_accelerator(args)        # checks that a DeepSpeed teacher engine has a DeepSpeed launch
    teacher = prepare_teacher(teacher, args, accelerator)   # frozen, eval mode, teacher_dtype, chosen engine

Loss (Hinton et al. 2015; DistilBERT's three terms), averaged over the predicted tokens (labels != -100):
    alpha_kd * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + alpha_ce * CE(student, labels)
    + alpha_cos * (1 - cos(student final hidden state, teacher final hidden state))
T^2 keeps the soft-target gradients on the scale of the hard-label ones when T changes.
"""

from __future__ import annotations

import copy
import os
import re

import torch
import torch.nn.functional as F

from dsrecipes.config.errors import ConfigError
from dsrecipes.train.models import transformer_blocks

TEACHER_ENGINES = ("plain", "zero3", "inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- loss
def distillation_loss(
    s_logits,
    t_logits,
    labels,
    temperature: float,
    alpha_kd: float,
    alpha_ce: float,
    alpha_cos: float = 0.0,
    s_hidden=None,
    t_hidden=None,
):
    """-> (total loss, {"kd", "ce", "cos", "loss"} as floats). Logits are [batch, seq, vocab], causal (shifted here)."""
    s = s_logits[:, :-1].float()
    t = t_logits[:, :-1].float()
    y = labels[:, 1:]
    mask = y != -100
    s, t, y = s[mask], t[mask], y[mask]  # [tokens, vocab]
    ce = F.cross_entropy(s, y)
    kd = (
        F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    total = alpha_kd * kd + alpha_ce * ce
    terms = {"kd": kd.detach().item(), "ce": ce.detach().item()}
    if alpha_cos:
        if s_hidden is None or t_hidden is None or s_hidden.shape[-1] != t_hidden.shape[-1]:
            raise ConfigError(
                "<args>",
                "alpha_cos",
                "the hidden-state loss needs student and teacher hidden states of the same width",
                "set alpha_cos: 0 or use a student as wide as the teacher",
            )
        hmask = mask  # same positions as the token losses
        cos = 1 - F.cosine_similarity(s_hidden[:, :-1][hmask].float(), t_hidden[:, :-1][hmask].float(), dim=-1).mean()
        total = total + alpha_cos * cos
        terms["cos"] = cos.detach().item()
    terms["loss"] = total.detach().item()
    return total, terms


# ----------------------------------------------------------------------------- student
def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher block copied into each student block: every other one (0, 2, 4, ...) when halving, as DistilBERT
    did; in general evenly spaced from block 0."""
    if not 1 <= n_student <= n_teacher:
        raise ConfigError(
            "<args>",
            "student_num_layers",
            f"{n_student} is not in 1..{n_teacher} (teacher depth)",
            f"use 1..{n_teacher}, or 0 for half the teacher",
        )
    return [(i * n_teacher) // n_student for i in range(n_student)]


def _blocks_prefix(model) -> str:
    blocks = transformer_blocks(model)
    return next(name for name, mod in model.named_modules() if mod is blocks) + "."


def student_config(teacher_config, num_layers: int, mapping: list[int] | None = None):
    """The teacher's config with num_layers blocks; per-layer lists (Qwen2/Mistral layer_types: full or sliding
    attention) follow the blocks copied from the teacher (mapping), else the first num_layers."""
    cfg = copy.deepcopy(teacher_config)
    for key in ("n_layer", "num_hidden_layers", "num_layers"):
        if hasattr(cfg, key):
            setattr(cfg, key, num_layers)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) != num_layers:
        cfg.layer_types = [types[i] for i in (mapping or range(num_layers))]
    return cfg


def student_from_teacher(teacher, num_layers: int, init: str, seed: int = 0):
    """A student with `num_layers` blocks and the teacher's width; init 'teacher_layers' copies embeddings, final
    norm, head and every other block from the teacher; 'scratch' keeps the fresh initialisation."""
    from transformers import AutoModelForCausalLM

    n_teacher = len(transformer_blocks(teacher))
    num_layers = num_layers or max(1, n_teacher // 2)
    mapping = layer_map(n_teacher, num_layers)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(student_config(teacher.config, num_layers, mapping))
    if init == "scratch":
        return student, mapping
    prefix = _blocks_prefix(teacher)
    t_state = teacher.state_dict()
    block_re = re.compile("^" + re.escape(prefix) + r"(\d+)\.(.*)$")
    new_state = {}
    for name in student.state_dict():
        m = block_re.match(name)
        src = f"{prefix}{mapping[int(m.group(1))]}.{m.group(2)}" if m else name
        if src not in t_state:
            raise ConfigError(
                "<args>",
                "student_init",
                f"teacher has no weight {src!r} for student {name!r}",
                "use student_init: scratch for this architecture",
            )
        new_state[name] = t_state[src].detach().clone()
    student.load_state_dict(new_state)
    student.tie_weights()
    return student, mapping


# ----------------------------------------------------------------------------- teacher
def load_teacher(path: str | None):
    """A frozen, eval-mode causal LM from a train_lm final/ dir, any local HF dir, or a hub name."""
    from transformers import AutoModelForCausalLM

    if not path:
        raise ConfigError(
            "<args>",
            "teacher_name_or_path",
            "not set",
            "give a train_lm final/ directory, a local causal-LM directory or a hub name",
        )
    try:
        teacher = AutoModelForCausalLM.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad teacher input
        fix = (
            "the directory needs config.json and weights (a train_lm final/ works)"
            if os.path.isdir(path)
            else "give a local directory, or a hub name with a network (HF_HUB_OFFLINE=0)"
        )
        raise ConfigError(
            "<args>",
            "teacher_name_or_path",
            f"cannot load {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
            fix,
        ) from None
    teacher.eval().requires_grad_(False)
    return teacher


def teacher_ds_config(args, world_size: int) -> dict:
    """ZeRO-3 inference config of the teacher's DeepSpeed engine (no optimizer: nothing of it trains). Its "auto"
    values come from the one filler, dsrecipes.config.deepspeed.fill_auto, with the teacher's dtype as precision."""
    from dsrecipes.config.deepspeed import fill_auto

    template = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(args.teacher_dtype, "no")
    return fill_auto(template, args, world_size, precision)


def make_distill_accelerator(args):
    """training.make_accelerator's Accelerator, after checking that a DeepSpeed teacher engine has a DeepSpeed launch.
    The ZeRO-3 teacher is not one of the accelerator's models (see prepare_teacher)."""
    from dsrecipes.train.accelerator import make_accelerator

    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if args.teacher_engine in ("zero3", "inference") and not use_ds:
        raise ConfigError(
            "<args>",
            "teacher_engine",
            f"{args.teacher_engine} needs a DeepSpeed launch",
            "launch with a DeepSpeed accelerate config, or use teacher_engine: plain",
        )
    return make_accelerator(args, project="distill")


def prepare_teacher(teacher, args, accelerator):
    """Put the frozen teacher on its engine: plain (a copy per process), zero3 (ZeRO-3 inference: the weights
    partitioned over the processes, gathered layer by layer in forward) or DeepSpeed's init_inference.
    The ZeRO-3 engine comes from deepspeed.initialize, not accelerator.prepare: a prepared model would be part of
    every save_state (an engine without an optimizer cannot be checkpointed) and load_state, and accelerate's
    backward() and get_state_dict must keep following the student's engine. Its weights come from
    teacher_name_or_path again on a resume."""
    dtype = DTYPES[args.teacher_dtype]
    if args.teacher_engine == "plain":
        return teacher.to(device=accelerator.device, dtype=dtype)
    import deepspeed

    if args.teacher_engine == "inference":
        return deepspeed.init_inference(teacher, dtype=dtype, replace_with_kernel_inject=False)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    engine, *_ = deepspeed.initialize(model=teacher, config=teacher_ds_config(args, world))
    engine.eval()
    return engine


@torch.no_grad()
def teacher_forward(teacher, batch, want_hidden: bool):
    out = teacher(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), output_hidden_states=want_hidden
    )
    return out.logits, (out.hidden_states[-1] if want_hidden else None)
