"""The DeepSpeed pipeline engine for a recipe: data as micro-batches, the engine built from a recipe's args, and the
engine seen as an "accelerator" by dsrecipes.train.checkpoints.

    train_ds, eval_ds, info = load_datasets(args, tokenizer)         # rank 0 fills the datasets cache first
    engine, pipe, config = build_engine(args, settings, tokenizer, where)
    batches = MicroBatches(train_ds, micro, dp_rank, dp, seed)       # endless, resumable at (epoch, position)
    loss = engine.train_batch(batches)
    run = EngineRun(engine)                                          # Checkpoints(run, ...), StopFlag.requested(run)
Used by recipes/train_pipeline.py.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from dsrecipes.config.errors import ConfigError


# ---------------------------------------------------------------------------- data
def load_datasets(args, tokenizer):
    """build_lm_datasets on every rank, rank 0 first (it fills the datasets cache the others then read)."""
    from dsrecipes.train.data import build_lm_datasets

    rank = dist.get_rank()
    if rank != 0:
        dist.barrier()
    out = build_lm_datasets(args, tokenizer)
    if rank == 0:
        dist.barrier()
    return out


class MicroBatches:
    """Endless (input_ids, labels) micro-batches of this data-parallel rank's shard, reshuffled every epoch.
    The order depends only on (seed, epoch), so a resume continues from (epoch, position) exactly."""

    def __init__(self, ds, size: int, dp_rank: int, dp: int, seed: int, epoch: int = 0, position: int = 0):
        self.ids = torch.as_tensor(np.asarray(ds["input_ids"]))
        self.size, self.dp_rank, self.dp, self.seed = size, dp_rank, dp, seed
        self.per_rank = len(self.ids) // dp
        self.per_epoch = self.per_rank // size
        self.epoch, self.position, self.data_sum, self._order = epoch, position, 0, None

    def order(self):
        if self._order is None or self._order[0] != self.epoch:
            perm = torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self._order = (self.epoch, perm[: self.per_rank * self.dp].view(self.per_rank, self.dp)[:, self.dp_rank])
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self.order()[self.position * self.size : (self.position + 1) * self.size]
        self.position += 1
        x = self.ids[idx]
        self.data_sum += int(x.sum())
        return x, x


def eval_micro_batches(ds, size: int, dp_rank: int, dp: int, cap: int):
    ids = torch.as_tensor(np.asarray(ds["input_ids"]))
    n = (len(ids) // dp) // size
    n = min(n, cap) if cap else n
    mine = ids[: n * size * dp].view(n * dp, size, -1)[dp_rank::dp]
    return [(x, x) for x in mine]


def check_batches(batches: MicroBatches, eval_batches: list, args, where: str) -> None:
    if batches.per_epoch < args.gradient_accumulation_steps:
        raise ConfigError(
            where,
            "per_device_train_batch_size",
            f"one epoch has {batches.per_epoch} micro-batches per "
            f"rank, fewer than gradient_accumulation_steps={args.gradient_accumulation_steps}",
            "use more data or smaller batches",
        )
    if not eval_batches:
        raise ConfigError(
            where, "eval_docs", "the eval set has no full micro-batch per data-parallel rank", "use more eval data"
        )


# ---------------------------------------------------------------------------- the engine
def build_engine(args, settings, tokenizer, where: str):
    """PipelineModule with the HF weights of this stage, activation checkpointing and static freezing as the recipe
    says (dsrecipes.pipeline.techniques), the recipe's optimizer and schedule, deepspeed.initialize.
    -> (engine, pipe, HF config of the model being trained). Needs the process group (init_distributed)."""
    import deepspeed

    from dsrecipes.pipeline import techniques
    from dsrecipes.pipeline.hf_weights import load_hf_weights, weight_source
    from dsrecipes.pipeline.layers import build_pipeline, pipeline_config
    from dsrecipes.train.accelerator import make_scheduler
    from dsrecipes.train.optimizers import build_optimizer

    config = pipeline_config(args, tokenizer)
    source = weight_source(args, config, tokenizer)  # before any other RNG use: the same init on every rank
    plan = techniques.checkpointing_plan(args, config, settings.ds_config, where)
    config, aliases = techniques.head_config(config, args)
    pipe = build_pipeline(config, args.num_stages, args.partition_method, plan.interval, where, plan.func)
    load_hf_weights(pipe, source, aliases)
    del source
    pipe.dsr_checkpointing = plan.report()
    frozen = techniques.freeze_static(pipe, config, args, plan, where) if techniques.freezes(args) else 0
    pipe.dsr_frozen_params = frozen
    optimizer = build_optimizer(pipe, args)
    scheduler = make_scheduler(optimizer, args)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=settings.ds_config
    )
    return engine, pipe, config


def engine_summary(args, engine, pipe) -> dict:
    """Collective: the pipeline's part of summary.json (parameters counted once over the stages)."""
    params = torch.tensor([sum(p.numel() for p in pipe.parameters() if not getattr(p, "ds_pipe_replicated", False))])
    dist.all_reduce(params, group=engine.grid.get_pipe_parallel_group())
    return {
        "num_stages": args.num_stages,
        "micro_batches": engine.micro_batches,
        "micro_batch_size": engine.micro_batch_size,
        "partition_method": args.partition_method,
        "partition": [int(x) for x in pipe.parts],
        "activation_checkpoint_interval": pipe.activation_checkpoint_interval,
        "activation_checkpointing": pipe.dsr_checkpointing,
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": args.optimizer,
        "params": int(params.item()),
        "frozen_params": pipe.dsr_frozen_params,
    }


class EngineRun:
    """The few Accelerator members that dsrecipes.train.checkpoints (Checkpoints, StopFlag) uses, over the engine."""

    def __init__(self, engine):
        self.engine, self.device = engine, engine.device
        self.num_processes, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main_process = self.rank == 0

    def wait_for_everyone(self):
        dist.barrier()

    def reduce(self, tensor, reduction="sum"):
        dist.all_reduce(tensor)
        return tensor if reduction == "sum" else tensor / self.num_processes

    def save_state(self, path):
        self.engine.save_checkpoint(path, tag="engine")  # per-layer files, optimizer states per rank, lr schedule
        torch.save(
            {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            os.path.join(path, f"rng_state_{self.rank}.pt"),
        )

    def load_state(self, path):
        load_path, _ = self.engine.load_checkpoint(path, tag="engine")
        rng_file = os.path.join(path, f"rng_state_{self.rank}.pt")
        if load_path is None or not os.path.isfile(rng_file):
            raise ConfigError(
                "<args>",
                "resume_from",
                f"{path} was not written by this recipe with {self.num_processes} processes",
                "resume with the same launch line, or start fresh",
            )
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
