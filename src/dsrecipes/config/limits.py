"""Ranges and library-defined choices of the recipe fields (config/args.py), checked for YAML and CLI values.

    check_range("learning_rate", 0.0, "r.yaml")    # ConfigError: must be > 0
    CHOICES_FROM["lr_scheduler_type"]()            # transformers' SchedulerType values

Kept beside the dataclasses rather than in field metadata because HfArgumentParser hands every metadata key to
argparse.add_argument, which refuses unknown keywords such as `min`.
"""

from __future__ import annotations

from dsrecipes.config.errors import ConfigError

# name -> (lowest, highest, whether the lowest itself is allowed)
_POS, _NONNEG, _FRAC = (0, None, False), (0, None, True), (0, 1, True)
_ONE = (1, None, True)
LIMITS = {
    "learning_rate": _POS,
    "adam_epsilon": _POS,
    "temperature": _POS,
    "per_device_train_batch_size": _ONE,
    "per_device_eval_batch_size": _ONE,
    "gradient_accumulation_steps": _ONE,
    "max_steps": _ONE,
    "logging_steps": _ONE,
    "eval_steps": _ONE,
    "block_size": _ONE,
    "generated_docs": _ONE,
    "num_stages": _ONE,
    "tp_size": _ONE,
    "max_batch_size": _ONE,
    "max_queue": _ONE,
    "max_tokens_limit": _ONE,
    "default_max_tokens": _ONE,
    "max_prompt_tokens": _ONE,
    "max_body_bytes": _ONE,
    "freeze_check_steps": _ONE,
    "freeze_window": _ONE,
    "warmup_steps": _NONNEG,
    "weight_decay": _NONNEG,
    "max_grad_norm": _NONNEG,
    "save_steps": _NONNEG,
    "save_total_limit": _NONNEG,
    "eval_docs": _NONNEG,
    "max_eval_batches": _NONNEG,
    "checkpoint_every_k": _NONNEG,
    "freeze_first_n_blocks": _NONNEG,
    "freeze_progressive_blocks": _NONNEG,
    "freeze_cache_max_mb": _NONNEG,
    "freeze_threshold": _NONNEG,
    "student_num_layers": _NONNEG,
    "activation_checkpoint_interval": _NONNEG,
    "alpha_kd": _NONNEG,
    "alpha_ce": _NONNEG,
    "alpha_cos": _NONNEG,
    "max_wait_ms": _NONNEG,
    "num_threads": _NONNEG,
    "shutdown_timeout_s": _NONNEG,
    "port": (0, 65535, True),
    "adam_beta1": _FRAC,
    "adam_beta2": _FRAC,
    "eval_fraction": _FRAC,
    "freeze_start": _FRAC,
    "freeze_end": _FRAC,
}


def scheduler_types() -> list[str]:
    """transformers' SchedulerType values: what get_scheduler(lr_scheduler_type) accepts (imported without peft:
    dsrecipes.compat.transformers_optimization)."""
    from dsrecipes.compat import transformers_optimization

    return [s.value for s in transformers_optimization().SchedulerType]


CHOICES_FROM = {"lr_scheduler_type": scheduler_types}  # choices known only to a library (read when checked)


def check_range(key: str, value, where: str) -> None:
    low, high, closed = LIMITS.get(key, (None, None, True))
    if _base_number(value) is None:
        return
    if low is not None and (value < low or (value == low and not closed)):
        need = f">= {low}" if closed else f"> {low}"
        raise ConfigError(where, key, f"{value!r} is out of range (must be {need})", f"write a value {need}")
    if high is not None and value > high:
        raise ConfigError(where, key, f"{value!r} is out of range (must be <= {high})", f"write a value <= {high}")


def _base_number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def float_hint(key: str, value) -> str:
    """A float given as text. Recipe YAML is read with YAML 1.2 floats (args.RecipeLoader), so an unquoted 3e-4 is
    a number already: a numeric string here was quoted (or the file was read as YAML 1.1): say to drop the quotes."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return f"write it unquoted, e.g. {key}: 0.001"
        return f"write it unquoted: {key}: {value.strip()}"
    return f"write it unquoted, e.g. {key}: 0.001"
