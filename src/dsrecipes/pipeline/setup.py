"""Start-up of a pipeline run: recipe checks, mixed precision, the DeepSpeed JSON with "auto" filled, the process group.

    settings = prepare(args, where)     # checks + precision + world/dp + DeepSpeed config, before any process group
    init_distributed()                  # torchrun-style env (accelerate, deepspeed, torchrun) or a 1-rank bare run

accelerate only launches the processes of a pipeline run: its DeepSpeed integration cannot drive a PipelineModule,
so the recipe calls deepspeed.initialize itself, with the JSON that accelerate names. ZeRO 0 and 1 only.
Used by recipes/train_pipeline.py.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from dsrecipes.config import check, rules
from dsrecipes.config.errors import ConfigError, ConfigErrors
from dsrecipes.pipeline.techniques import check_args

DEFAULT_DS = rules.DEFAULT_PIPELINE_DS  # configs/deepspeed/zero1.json
RECIPE_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


@dataclass
class PipelineSettings:
    precision: str  # no | bf16 | fp16
    world: int  # processes
    dp: int  # data-parallel replicas of the pipeline
    ds_path: str  # the DeepSpeed JSON used
    ds_config: dict  # ... with this run's values in place of "auto"


def prepare(args, where: str) -> PipelineSettings:
    """Every start-up check that needs no process group, in the order the errors are reported."""
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
    return PipelineSettings(precision, world, dp, ds_path, ds_config)


def mixed_precision(args, where: str) -> str:
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision != "no" and launched != "no" and launched != args.mixed_precision:
        raise ConfigError(
            where,
            "mixed_precision",
            f"{args.mixed_precision} here but accelerate launch says {launched}",
            "set it in one place",
        )
    return args.mixed_precision if args.mixed_precision != "no" else launched


def deepspeed_config(args, where: str, dp: int, precision: str) -> tuple[str, dict]:
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
    on_cpu = not torch.cuda.is_available()
    rules.raise_first(  # ZeRO-2/3 first: the pipeline engine asserts stage < 2
        rules.settings_from(vars(args), ds, {"mixed_precision": precision}, dp, on_cpu, recipe_kind="pipeline"),
        {"recipe": where, "deepspeed": path},
        component="pipeline",
    )
    for key, fix in (
        ("pipeline", "set num_stages, partition_method and activation_checkpoint_interval in the recipe YAML"),
        ("optimizer", "the recipe builds the optimizer from optimizer, learning_rate, weight_decay and adam_*"),
        ("scheduler", "the recipe builds the schedule from lr_scheduler_type and warmup_steps"),
    ):
        if key in ds:
            raise ConfigError(path, key, "section not used by recipes/train_pipeline.py", f"remove it; {fix}")
    errs = check.lint_deepspeed(ds, path)
    errs += check.cross_check(
        vars(args), ds, {"mixed_precision": precision}, dp, where, path, "<launch>", on_cpu, recipe_kind="pipeline"
    )
    if errs:
        raise ConfigErrors(errs)
    return path, fill_pipeline_auto(ds, args, dp, precision)


def fill_pipeline_auto(ds: dict, args, dp: int, precision: str) -> dict:
    """deepspeed.initialize without accelerate: the batch keys and clipping come from the recipe also where the
    JSON leaves them out, then every "auto" is filled by dsrecipes.config.deepspeed.fill_auto."""
    from dsrecipes.config.deepspeed import fill_auto

    for key in RECIPE_KEYS:
        ds.setdefault(key, "auto")
    fill_auto(ds, args, dp, precision)
    if args.optimizer != "adamw":  # a client optimizer DeepSpeed has not tested with ZeRO (bitsandbytes, torchao)
        ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def init_distributed() -> None:
    """torchrun-style env (accelerate, deepspeed launcher, torchrun, one line per node); a bare python run = 1 rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
