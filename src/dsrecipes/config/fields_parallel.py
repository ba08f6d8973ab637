"""Sequence-parallel (Ulysses) and ALST tiling fields of the training recipes (dsrecipes.parallel.sequence).

sequence_parallel_size: 2   # split each sequence over 2 ranks (all-to-all attention); needs DeepSpeed ZeRO 1-3
tiled_mlp: true             # DeepSpeed TiledMLP on every decoder MLP (tiles along the sequence)
tiled_loss: true            # logits + cross-entropy tile by tile: the full logits tensor is never materialised

sp_size(values) and autotp_size(ds) are the one reader of the SP and AutoTP sizes: the rule table's sp and tp axes
(config/rules.settings_from), dsrecipes.parallel.sequence.sp_size and dsrecipes.parallel.tensor.tp_size call them.
"""

from dataclasses import dataclass

from dsrecipes.config.fields import _f
from dsrecipes.config.limits import LIMITS

# Ranges, checked for YAML and CLI values like every other field's (config/limits.check_range).
LIMITS.update({"sequence_parallel_size": (1, None, True), "tiled_mlp_shards": (0, None, True)})
LIMITS.update({"tiled_loss_shards": (0, None, True)})


@dataclass
class ParallelArguments:
    sequence_parallel_size: int = _f(
        1,
        "Ulysses sequence parallelism (DeepSpeed ALST through accelerate's ParallelismConfig): each sequence is split "
        "into this many shards, one per rank of an SP group; 1 = off. Llama-family models (position ids, sdpa).",
    )
    tiled_mlp: bool = _f(False, "ALST TiledMLP: each decoder MLP runs tile by tile along the sequence.")
    tiled_mlp_shards: int = _f(0, "Tiles per MLP call; 0 = auto: ceil(sequence length / hidden size), as ALST.")
    tiled_loss: bool = _f(
        False, "Tiled logits + loss (sequence_tiled_compute): the [batch, seq, vocab] logits are never materialised."
    )
    tiled_loss_shards: int = _f(0, "Tiles of the logits+loss; 0 = auto: at most 2^24 logits (64 MiB fp32) per tile.")


def positive_int(value, default: int = 1) -> int:
    """An int >= 1, else `default` (absent, 0, "auto", a bool, a typo: the range checks of config/limits.py and
    config/validate.py report a bad value; the readers here only say what the run uses)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return value if ok else default


def sp_size(values) -> int:
    """sequence_parallel_size of a recipe's values: a dict (YAML keys, vars(args)) or the parsed args; 1 = off."""
    key = "sequence_parallel_size"
    return positive_int(values.get(key) if isinstance(values, dict) else getattr(values, key, None))


def autotp_size(ds: dict | None) -> int:
    """tensor_parallel.autotp_size of a DeepSpeed config dict (absent, 0 and 1 mean no TP: 1)."""
    section = ds.get("tensor_parallel") if isinstance(ds, dict) else None
    return positive_int(section.get("autotp_size") if isinstance(section, dict) else None)
