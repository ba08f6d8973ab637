"""The one place that fills DeepSpeed "auto" values, and the list of the keys that get filled.

    ds = fill_auto(ds, args, world_size, mixed_precision)                 # every "auto" key (no accelerate involved)
    fill_auto(ds, args, world_size, mixed_precision, keys=RECIPE_OWNED)   # only what the recipe owns

Under `accelerate launch`, accelerate fills the batch sizes, precision, bucket sizes and optimizer/scheduler
values at prepare(); the recipe fills RECIPE_OWNED before that (accelerate would put its own default there).
The pipeline recipe and the distillation teacher's plugin call deepspeed.initialize without accelerate's
filling, so they fill every key here. `dsrecipes check` accepts "auto" exactly at FILLED_AUTO.
"""

from __future__ import annotations


def _precision(prec: str):
    return lambda a, world, mp, h: mp == prec


def _batch(a, world, mp, h):
    return int(a.per_device_train_batch_size) * int(a.gradient_accumulation_steps) * int(world)


# key -> value from (args, world size, mixed precision, hidden size); None: drop the key (DeepSpeed's default)
FILLERS = {
    "train_micro_batch_size_per_gpu": lambda a, world, mp, h: int(a.per_device_train_batch_size),
    "gradient_accumulation_steps": lambda a, world, mp, h: int(a.gradient_accumulation_steps),
    "train_batch_size": _batch,
    "gradient_clipping": lambda a, world, mp, h: float(a.max_grad_norm),
    "bf16.enabled": _precision("bf16"),
    "fp16.enabled": _precision("fp16"),
    # accelerate's sizes for a hidden size h (accelerator._prepare_deepspeed)
    "zero_optimization.reduce_bucket_size": lambda a, world, mp, h: h * h if h else None,
    "zero_optimization.stage3_prefetch_bucket_size": lambda a, world, mp, h: int(0.9 * h * h) if h else None,
    "zero_optimization.stage3_param_persistence_threshold": lambda a, world, mp, h: 10 * h if h else None,
    "optimizer.params.lr": lambda a, world, mp, h: float(a.learning_rate),
    "optimizer.params.weight_decay": lambda a, world, mp, h: float(a.weight_decay),
    "scheduler.params.warmup_min_lr": lambda a, world, mp, h: 0.0,
    "scheduler.params.warmup_max_lr": lambda a, world, mp, h: float(a.learning_rate),
    "scheduler.params.warmup_num_steps": lambda a, world, mp, h: int(a.warmup_steps),
    "scheduler.params.total_num_steps": lambda a, world, mp, h: int(a.max_steps),
}
FILLED_AUTO = frozenset(FILLERS)  # every key that may say "auto" in a shipped or user DeepSpeed JSON
RECIPE_OWNED = frozenset({"gradient_clipping"})  # accelerate fills the rest at prepare(), from the same values


def fill_auto(
    ds: dict,
    args,
    world_size: int,
    mixed_precision: str | None,
    hidden_size: int | None = None,
    keys=FILLED_AUTO,
) -> dict:
    """Write this run's value wherever `ds` says "auto" (in place; also returned). `args` carries the recipe's
    per_device_train_batch_size, gradient_accumulation_steps, max_grad_norm, learning_rate, weight_decay,
    warmup_steps and max_steps (only the ones the present "auto" keys need are read)."""
    for dotted in sorted(keys):
        *parents, leaf = dotted.split(".")
        node = ds
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get(leaf) != "auto":
            continue
        value = FILLERS[dotted](args, world_size, mixed_precision or "no", hidden_size)
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return ds


def remaining_auto(ds, prefix: str = "") -> list[str]:
    """Dotted keys still set to "auto" (after fill_auto nothing should be left)."""
    out = []
    for key, value in (ds or {}).items():
        if isinstance(value, dict):
            out += remaining_auto(value, f"{prefix}{key}.")
        elif value == "auto":
            out.append(f"{prefix}{key}")
    return out
