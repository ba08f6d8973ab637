"""Layer freezing (book ch. 8): frozen parameters get no gradients and no optimizer state.

    n_frozen = apply_static_freezing(model, args)   # freeze_embeddings, freeze_first_n_blocks, freeze_patterns
"""
from __future__ import annotations

import re

from dsrecipes.errors import ConfigError
from dsrecipes.models import transformer_blocks


def embedding_modules(model):
    emb = [model.get_input_embeddings()]
    for name in ("wpe", "embed_positions", "position_embeddings"):
        for _, mod in model.named_modules():
            if hasattr(mod, name):
                emb.append(getattr(mod, name))
                break
    return emb


def apply_static_freezing(model, args) -> int:
    """Set requires_grad=False per the config; returns the number of frozen parameter elements."""
    blocks = transformer_blocks(model) if args.freeze_first_n_blocks else []
    if args.freeze_first_n_blocks > len(blocks):
        raise ConfigError("<args>", "freeze_first_n_blocks", f"{args.freeze_first_n_blocks} > {len(blocks)} blocks",
                          f"use at most {len(blocks)}")
    targets = list(blocks[: args.freeze_first_n_blocks])
    if args.freeze_embeddings:
        targets += embedding_modules(model)
    for mod in targets:
        for p in mod.parameters():
            p.requires_grad_(False)
    if args.freeze_patterns:
        try:
            pats = [re.compile(p) for p in args.freeze_patterns]
        except re.error as exc:
            raise ConfigError("<args>", "freeze_patterns", f"bad regex ({exc})", "fix the pattern") from None
        for name, p in model.named_parameters():
            if any(pat.search(name) for pat in pats):
                p.requires_grad_(False)
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if not p.requires_grad)
