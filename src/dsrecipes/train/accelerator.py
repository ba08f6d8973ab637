"""Pieces every training recipe shares: the Accelerator, DeepSpeed "auto" values owned by the recipe,
dataloaders with a resumable order, the LR schedule, and eval loss/perplexity.

    accelerator = make_accelerator(args, project="train_lm")
    fill_deepspeed_from_recipe(accelerator, args)     # gradient_clipping etc. come from the recipe YAML
    train_dl, eval_dl = make_dataloaders(train_ds, eval_ds, args)
    loss = evaluate_lm(model, eval_dl, accelerator)
"""

from __future__ import annotations

import os

import torch

from dsrecipes import compat
from dsrecipes.config.errors import ConfigError
from dsrecipes.parallel import sequence, tensor
from dsrecipes.train import elastic


def make_accelerator(args, project: str):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    if compat.multi_cpu_launched_alone():
        raise ConfigError(
            "<accelerate launch>",
            "distributed_type",
            "MULTI_CPU with num_processes > 1 started ONE process (accelerate launch needs --mpirun_hostfile for it)",
            "run plain DDP on CPU as `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N recipes/...`, or use "
            "configs/accelerate/deepspeed_cpu_2proc.yaml",
        )
    compat.fix_cpu_deepspeed_world_size()
    compat.keep_zero3_init_dtype()  # before any zero.Init: the engine's Init keeps the model's dtype
    elastic.keep_global_batch(args, "<args>")  # resuming on another world size
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # One scheduler step per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "tensorboard")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        parallelism_config=sequence.parallelism_config(args),  # Ulysses SP (sequence_parallel_size > 1) or None
    )


def deepspeed_config(accelerator) -> dict | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.deepspeed_config if plugin is not None else None


def zero_stage(accelerator) -> int | None:
    cfg = deepspeed_config(accelerator)
    return None if cfg is None else int(cfg.get("zero_optimization", {}).get("stage", 0))


def run_facts(accelerator, args, model) -> dict:
    """The setup facts every training summary.json carries."""
    from dsrecipes.train.models import count_parameters

    return {
        "world_size": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "optimizer": args.optimizer,
        "params": count_parameters(accelerator.unwrap_model(model)),
    }


def fill_deepspeed_from_recipe(accelerator, args) -> None:
    """Values the recipe owns, written where the DeepSpeed JSON says "auto" (accelerate fills the rest at prepare();
    both go through dsrecipes.config.deepspeed, the one place "auto" values are known)."""
    from dsrecipes.config.deepspeed import RECIPE_OWNED, fill_auto

    cfg = deepspeed_config(accelerator)
    if cfg is not None:
        fill_auto(cfg, args, accelerator.num_processes, accelerator.mixed_precision, keys=RECIPE_OWNED)


def make_dataloaders(train_ds, eval_ds, args):
    from torch.utils.data import DataLoader

    # The loader's own generator: every new iterator draws its base seed from it, not from the global torch RNG.
    # Otherwise the iterator re-created on a mid-epoch resume shifts the dropout RNG stream by one draw and the
    # resumed run drifts from the uninterrupted one (tests/test_slurm.py::test_preempt_requeue_resume).
    train_dl = DataLoader(
        train_ds,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dl = DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size, shuffle=False)
    return train_dl, eval_dl


def make_scheduler(optimizer, args):
    get_scheduler = compat.transformers_optimization().get_scheduler  # without importing peft (compat)
    return get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps
    )


def per_sample_lm_loss(logits, labels) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence (labels == -100 ignored), shape [batch]."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    mask = (shift_labels != -100).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate_lm(model, eval_dl, accelerator, max_batches: int = 0) -> float:
    """Mean per-sequence loss over the eval set, gathered across ranks (the padding duplicates that make
    batches even are dropped by gather_for_metrics, which is why losses are kept per sample; under AutoTP each TP
    group counts once: parallel.tensor.gather_for_metrics)."""
    was_training = model.training
    model.eval()
    losses = []
    for i, batch in enumerate(eval_dl):
        if max_batches and i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        losses.append(tensor.gather_for_metrics(accelerator, per_sample_lm_loss(logits, batch["labels"])))
    model.train(was_training)
    return torch.cat(losses).mean().item()


def mean_across_ranks(accelerator, value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="mean")
    return value.item()
