"""Memory: switch activation checkpointing on from the config, and measure what each rank holds.

    apply_activation_checkpointing(model, args, accelerator)   # none | full | every_k | deepspeed
    report = measure(model, optimizer, accelerator)            # bytes of params/grads/optimizer state, peak RSS
"""
from __future__ import annotations

import resource

import torch

from dsrecipes.errors import ConfigError


def apply_activation_checkpointing(model, args, accelerator=None) -> None:
    mode = args.gradient_checkpointing
    if mode == "none":
        return
    if mode == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": args.gradient_checkpointing_reentrant})
        model.config.use_cache = False
        return
    raise ConfigError("<args>", "gradient_checkpointing", f"mode {mode!r} is not available in this build",
                      "use none or full")


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(model, optimizer, accelerator) -> dict:
    """Per-rank bytes held now, read from the real tensors (ZeRO partitions included), plus peak RSS."""
    params = sum(_tensor_bytes(getattr(p, "ds_tensor", p)) for p in model.parameters())
    state = 0
    opt = getattr(optimizer, "optimizer", optimizer)
    for _ in range(3):  # unwrap accelerate -> DeepSpeed ZeRO -> torch optimizer
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    for st in getattr(opt, "state", {}).values():
        state += sum(_tensor_bytes(v) for v in st.values())
    out = {"param_bytes": params, "optimizer_state_bytes": state, "peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
