"""Pipeline-parallel training of a GPT-2 causal LM with the DeepSpeed pipeline engine (1F1B), HF weights in and out.

Run (2 CPU processes = 2 pipeline stages):
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        --deepspeed_config_file configs/deepspeed/zero1.json \
        recipes/train_pipeline.py --config configs/recipes/pipeline_tiny.yaml [--key value ...]
    (make pipeline does exactly this; `deepspeed --num_gpus 2 recipes/train_pipeline.py ...` or torchrun work too,
    then the DeepSpeed JSON comes from deepspeed_config, default configs/deepspeed/zero1.json)

accelerate only launches the processes here: its DeepSpeed integration cannot drive a PipelineModule, so this
script calls deepspeed.initialize itself, with the JSON that accelerate names. ZeRO 0 and 1 only. The pipeline
settings (num_stages, partition_method, activation_checkpoint_interval) live in the recipe YAML, not the JSON.

Produces, in output_dir: metrics.jsonl (loss, tokens/s and the measured pipeline bubble per logged step),
summary.json, tensorboard/, checkpoints/step_*/ (+ latest) and final/ (a Hugging Face model directory).
"""

import os
import random
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from dsrecipes.config import check
from dsrecipes.config.args import RECIPES, parse_args
from dsrecipes.config.errors import ConfigError, ConfigErrors, exit_on_config_error
from dsrecipes.pipeline.layers import (
    BubbleMeter,
    build_pipeline,
    export_hf,
    load_hf_weights,
    pipeline_config,
    weight_source,
)
from dsrecipes.train.accelerator import make_scheduler
from dsrecipes.train.checkpoints import Checkpoints, StopFlag
from dsrecipes.train.data import build_lm_datasets, load_tokenizer
from dsrecipes.train.optimizers import build_optimizer
from dsrecipes.train.runlog import RunLog, perplexity

DEFAULT_DS = "configs/deepspeed/zero1.json"


# ---------------------------------------------------------------------------- configuration
def mixed_precision(args, where):
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision != "no" and launched != "no" and launched != args.mixed_precision:
        raise ConfigError(
            where,
            "mixed_precision",
            f"{args.mixed_precision} here but accelerate launch says {launched}",
            "set it in one place",
        )
    return args.mixed_precision if args.mixed_precision != "no" else launched


def deepspeed_config(args, where, dp: int, precision: str) -> tuple[str, dict]:
    """The DeepSpeed JSON with this run's values in place of "auto". ZeRO 0/1 only, no pipeline section."""
    launched = (
        os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        else None
    )
    if args.deepspeed_config and launched and os.path.abspath(args.deepspeed_config) != os.path.abspath(launched):
        raise ConfigError(
            where,
            "deepspeed_config",
            f"{args.deepspeed_config} here but accelerate launch names {launched}",
            "set it in one place (accelerate --deepspeed_config_file or the recipe)",
        )
    path = args.deepspeed_config or launched or DEFAULT_DS
    ds = check.load_json(path)
    stage = check._get(ds, "zero_optimization.stage", 0)
    if stage not in (0, 1):
        raise ConfigError(
            path,
            "zero_optimization.stage",
            f"ZeRO-{stage} cannot be combined with pipeline parallelism "
            "(DeepSpeed's pipeline engine supports ZeRO 0 and 1 only)",
            f"use {DEFAULT_DS} (accelerate launch --deepspeed_config_file {DEFAULT_DS})",
        )
    for key, fix in (
        ("pipeline", "set num_stages, partition_method and activation_checkpoint_interval in the recipe YAML"),
        ("optimizer", "the recipe builds AdamW from learning_rate, weight_decay and adam_* in its YAML"),
        ("scheduler", "the recipe builds the schedule from lr_scheduler_type and warmup_steps"),
    ):
        if key in ds:
            raise ConfigError(path, key, "section not used by recipes/train_pipeline.py", f"remove it; {fix}")
    errs = check.lint_deepspeed(ds, path)
    errs += check.cross_check(
        vars(args),
        ds,
        {"mixed_precision": precision},
        dp,
        where,
        path,
        "<launch>",
        on_cpu=not torch.cuda.is_available(),
    )
    if errs:
        raise ConfigErrors(errs)
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    fill = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * dp,
        "gradient_clipping": float(args.max_grad_norm),
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for prec in ("bf16", "fp16"):
        if check._get(ds, f"{prec}.enabled") == "auto":
            ds[prec]["enabled"] = precision == prec
    if check._get(ds, "zero_optimization.reduce_bucket_size") == "auto":
        del ds["zero_optimization"]["reduce_bucket_size"]
    ds.setdefault("steps_per_print", 10**9)
    return path, ds


def check_args(args, where):
    if args.gradient_checkpointing != "none":
        raise ConfigError(
            where,
            "gradient_checkpointing",
            "the HF option does not reach pipeline layers",
            "use activation_checkpoint_interval: k (checkpoint every k layers of a stage)",
        )
    if args.freeze_embeddings or args.freeze_first_n_blocks or args.freeze_patterns:
        raise ConfigError(
            where, "freeze_*", "freezing is not supported by the pipeline recipe", "remove the freeze_* keys"
        )
    if args.optimizer != "adamw":
        raise ConfigError(
            where, "optimizer", f"{args.optimizer} is not supported with the pipeline engine", "use adamw"
        )


def init_distributed():
    """torchrun-style env (accelerate, deepspeed launcher, torchrun, one line per node); a bare python run = 1 rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)


# ---------------------------------------------------------------------------- data
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


# ---------------------------------------------------------------------------- the engine as an "accelerator"
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


# ---------------------------------------------------------------------------- main
@exit_on_config_error
def main(argv=None):
    # ------------------------------------------------------------------ parse and check
    args, config_path = parse_args(RECIPES["train_pipeline"], argv)
    where = config_path or "<cli>"
    check_args(args, where)
    precision = mixed_precision(args, where)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by every launcher; checked before any process group exists
    dp = max(world // max(args.num_stages, 1), 1)
    ds_path, ds_config = deepspeed_config(args, where, dp, precision)
    if args.num_stages < 1 or world % args.num_stages:
        raise ConfigError(
            where,
            "num_stages",
            f"{args.num_stages} stage(s) do not divide the world size {world}",
            f"launch a multiple of {args.num_stages} processes (e.g. accelerate launch --num_processes "
            f"{args.num_stages}) or change num_stages",
        )
    init_distributed()
    rank = dist.get_rank()
    stop = StopFlag()
    from transformers import set_seed

    set_seed(args.seed)
    t_start = time.time()

    # ------------------------------------------------------------------ data and model
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
    if rank != 0:
        dist.barrier()  # rank 0 fills the datasets cache first
    train_ds, eval_ds, data_info = build_lm_datasets(args, tokenizer)
    if rank == 0:
        dist.barrier()
    config = pipeline_config(args, tokenizer)
    source = weight_source(args, config, tokenizer)  # before any other RNG use: the same init on every rank
    pipe = build_pipeline(config, args.num_stages, args.partition_method, args.activation_checkpoint_interval, where)
    load_hf_weights(pipe, source)
    del source
    optimizer = build_optimizer(pipe, args)
    scheduler = make_scheduler(optimizer, args)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    meter = BubbleMeter(engine)
    run = EngineRun(engine)
    dp_rank = engine.grid.get_data_parallel_rank()
    writer = None
    if rank == 0 and args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))

    # ------------------------------------------------------------------ resume
    ckpt = Checkpoints(run, args.output_dir, keep_last=args.save_total_limit)
    resume_path = ckpt.resolve(args.resume_from)
    state = ckpt.load(resume_path) if resume_path else {"step": 0, "epoch": 0, "position": 0}
    step = state["step"]
    log = RunLog(args.output_dir, enabled=rank == 0, resume_step=step)
    batches = MicroBatches(
        train_ds, args.per_device_train_batch_size, dp_rank, dp, args.seed, state["epoch"], state["position"]
    )
    if batches.per_epoch < args.gradient_accumulation_steps:
        raise ConfigError(
            where,
            "per_device_train_batch_size",
            f"one epoch has {batches.per_epoch} micro-batches per "
            f"rank, fewer than gradient_accumulation_steps={args.gradient_accumulation_steps}",
            "use more data or smaller batches",
        )
    eval_batches = eval_micro_batches(eval_ds, args.per_device_train_batch_size, dp_rank, dp, args.max_eval_batches)
    if not eval_batches:
        raise ConfigError(
            where, "eval_docs", "the eval set has no full micro-batch per data-parallel rank", "use more eval data"
        )
    if resume_path and rank == 0:
        print(f"resumed from {resume_path} at step {step}")

    # ------------------------------------------------------------------ train
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * dp * args.block_size
    first_loss, train_loss, eval_loss = state.get("first_loss"), state.get("last_loss"), state.get("eval_loss")
    tokens_seen, t_loop, preempted, bubble = 0, time.time(), False, None
    while step < args.max_steps and not preempted:
        with meter.step():
            train_loss = float(engine.train_batch(batches))
        step += 1
        tokens_seen += tokens_per_step
        first_loss = train_loss if first_loss is None else first_loss
        if step % args.logging_steps == 0 or step == args.max_steps:
            bubble = meter.collect()
            rec = {
                "step": step,
                "loss": train_loss,
                "lr": engine.get_lr()[0],
                "epoch": batches.epoch,
                "tokens_per_s": tokens_seen / max(time.time() - t_loop, 1e-9),
                "data_sum": batches.data_sum,
                **bubble,
            }
            log.write(rec)
            batches.data_sum = 0
            if writer:
                for key in ("loss", "lr", "tokens_per_s", "bubble_measured"):
                    writer.add_scalar(f"train/{key}", rec[key], step)
        if step % args.eval_steps == 0 or step == args.max_steps:
            eval_loss = float(engine.eval_batch(iter(eval_batches), num_micro_batches=len(eval_batches)))
            log.write({"step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)})
            if writer:
                writer.add_scalar("eval/loss", eval_loss, step)
        preempted = stop.requested(run)
        done = step >= args.max_steps
        if (args.save_steps and step % args.save_steps == 0) or done or preempted:
            ckpt.save(
                step,
                {
                    "step": step,
                    "epoch": batches.epoch,
                    "position": batches.position,
                    "first_loss": first_loss,
                    "last_loss": train_loss,
                    "eval_loss": eval_loss,
                },
            )
    train_time = time.time() - t_loop
    totals = meter.collect(total=True)

    # ------------------------------------------------------------------ export and summary
    final_dir, tied_diff = None, None
    if not preempted and args.export_final:
        final_dir = os.path.join(args.output_dir, "final")
        tied_diff = export_hf(pipe, config, tokenizer, final_dir)
    params = torch.tensor([sum(p.numel() for p in pipe.parameters() if not getattr(p, "ds_pipe_replicated", False))])
    dist.all_reduce(params, group=engine.grid.get_pipe_parallel_group())
    summary = {
        "recipe": "train_pipeline",
        "status": "preempted" if preempted else "completed",
        "steps": step,
        "first_loss": first_loss,
        "final_loss": train_loss,
        "final_eval_loss": eval_loss,
        "final_eval_ppl": perplexity(eval_loss) if eval_loss is not None else None,
        "unigram_entropy": data_info["unigram_entropy"],
        "train_blocks": data_info["train_blocks"],
        "eval_micro_batches": len(eval_batches),
        "world_size": world,
        "num_stages": args.num_stages,
        "data_parallel_size": dp,
        "micro_batches": engine.micro_batches,
        "micro_batch_size": engine.micro_batch_size,
        "partition_method": args.partition_method,
        "partition": [int(x) for x in pipe.parts],
        "activation_checkpoint_interval": args.activation_checkpoint_interval,
        "deepspeed_config": ds_path,
        "zero_stage": engine.zero_optimization_stage(),
        "mixed_precision": precision,
        "params": int(params.item()),
        "train_time_s": train_time,
        "wall_time_s": time.time() - t_start,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_seen / max(train_time, 1e-9),
        "bubble": totals,
        "tied_max_abs_diff": tied_diff,
        "resumed_from": resume_path,
        "final_dir": final_dir,
    }
    log.summary(summary)
    if rank == 0:
        if writer:
            writer.close()
        what = f"preempted at step {step}; resume with --resume_from latest" if preempted else f"trained {step} steps"
        print(
            f"{what} on {args.num_stages} pipeline stages x {dp} data-parallel: loss {first_loss:.3f} -> "
            f"{train_loss:.3f}, eval loss {eval_loss:.3f}, bubble {totals['bubble_measured']:.3f} measured vs "
            f"{totals['bubble_formula']:.3f} formula; outputs in {os.path.abspath(args.output_dir)}"
            + (f"; model in {final_dir}" if final_dir else "")
        )
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
