"""Sequence-parallel (Ulysses) and ALST tiling fields of the training recipes (dsrecipes.parallel.sequence).

sequence_parallel_size: 2   # split each sequence over 2 ranks (all-to-all attention); needs DeepSpeed ZeRO 1-3
tiled_mlp: true             # DeepSpeed TiledMLP on every decoder MLP (tiles along the sequence)
tiled_loss: true            # logits + cross-entropy tile by tile: the full logits tensor is never materialised
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
