"""Optimizers for the recipes: torch AdamW, bitsandbytes 8-bit AdamW (paged on GPU), torchao 8/4-bit AdamW.

    optimizer = build_optimizer(model, args)     # args: optimizer, learning_rate, weight_decay, adam_*

Only trainable parameters are given to the optimizer, so frozen ones get no optimizer state.
Under ZeRO-Offload, accelerate swaps torch AdamW for DeepSpeedCPUAdam; 8-bit optimizers cannot be
offloaded and `dsrecipes check` refuses that combination.
"""

from __future__ import annotations

from dsrecipes.config.errors import ConfigError

EIGHT_BIT = {"adamw_8bit", "paged_adamw_8bit", "torchao_adamw_8bit", "torchao_adamw_4bit"}


def param_groups(model, weight_decay: float):
    """Decay matrices only; biases and norms get no weight decay (the GPT-2/BERT convention).

    Under zero.Init every parameter is a 1-D (often empty) local partition: its full shape is p.ds_shape."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, args):
    import torch

    groups = param_groups(model, args.weight_decay)
    if not groups:
        raise ConfigError("<args>", "freeze_*", "every parameter is frozen: nothing to train", "freeze fewer blocks")
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    name = args.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        if name == "paged_adamw_8bit" and not torch.cuda.is_available():
            raise ConfigError(
                "<args>",
                "optimizer",
                "paged_adamw_8bit pages optimizer state through CUDA unified memory",
                "use adamw_8bit on CPU",
            )
        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        # min_8bit_size=0: quantize every state tensor, also the small ones of a tiny test model.
        return cls(groups, min_8bit_size=0, **kw)
    if name in ("torchao_adamw_8bit", "torchao_adamw_4bit"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW8bit if name.endswith("8bit") else AdamW4bit
        return cls(groups, **kw)
    raise ConfigError(
        "<args>",
        "optimizer",
        f"unknown optimizer {name!r}",
        "use adamw, adamw_8bit, paged_adamw_8bit, torchao_adamw_8bit or torchao_adamw_4bit",
    )
