"""Packing several conversations into one row without attention across them, and the padded layout to compare with.

    rows = pack(examples, block_size)                  # first fit, in order; each row <= block_size tokens
    batch = collate_packed(rows[:8], pad_id)           # input_ids, labels, position_ids (no attention_mask)
    batch = collate_padded(examples[:8], pad_id)       # input_ids, labels, attention_mask: one conversation a row
    batch = collate_packed(rows[:8], pad_id, width=256)  # every row exactly 256 wide (what freeze_cache needs)
    check_packing(model, where)                        # refuses a model that would attend across conversations

The packed layout is transformers' DataCollatorWithFlattening's (tests/test_sft.py compares them): input_ids and
labels concatenated, the first label of each conversation -100, position_ids restarting at 0 for each one, and no
attention_mask. From such position_ids transformers (masking_utils.find_packed_sequence_indices, used by
create_causal_mask when attention_mask is None) builds a block-diagonal causal mask for sdpa and eager attention
on Llama-family models and GPT-2. Padding at the end of a row is one more segment (positions 0.. again, labels -100),
so it neither attends to nor is attended by a conversation. Both collators add `real_tokens` (non-padding tokens per
row), which the recipe's loss hook pops before calling the model.

Rows are padded to the longest in the batch, or to a fixed `width` (the recipe passes block_size when freeze_cache is
on): the prefix cache keys a row by its content, padding included, so a row must come back with the same padding in
every epoch to be found again (dsrecipes.sft.data.collate_width; tests/test_sft.py).
"""

from __future__ import annotations

import torch

from dsrecipes.config.errors import ConfigError

IGNORE = -100


def pack(examples: list[dict], block_size: int) -> list[list[dict]]:
    """First-fit packing in order: -> rows, each a list of examples whose lengths sum to <= block_size."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        if n > block_size:
            raise ValueError(f"example of {n} tokens is longer than block_size {block_size}")
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(block_size - n)
    return rows


def flatten_row(row: list[dict]) -> dict:
    """One packed row: concatenated ids and labels (first label of each conversation -100), per-conversation
    position ids."""
    ids, labels, pos = [], [], []
    for ex in row:
        ids += list(ex["input_ids"])
        labels += [IGNORE] + list(ex["labels"][1:])
        pos += list(range(len(ex["input_ids"])))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def collate_packed(rows: list[list[dict]], pad_id: int, width: int | None = None) -> dict:
    flat = [flatten_row(r) for r in rows]
    width = width or max(len(f["input_ids"]) for f in flat)
    out = {"input_ids": [], "labels": [], "position_ids": [], "real_tokens": []}
    for f in flat:
        pad = width - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        out["labels"].append(f["labels"] + [IGNORE] * pad)
        out["position_ids"].append(f["position_ids"] + list(range(pad)))
        out["real_tokens"].append(len(f["input_ids"]))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def collate_padded(examples: list[dict], pad_id: int, width: int | None = None) -> dict:
    """One conversation per row, right-padded to the longest in the batch (or to `width`)."""
    width = width or max(len(ex["input_ids"]) for ex in examples)
    out = {"input_ids": [], "labels": [], "attention_mask": [], "real_tokens": []}
    for ex in examples:
        n = len(ex["input_ids"])
        out["input_ids"].append(list(ex["input_ids"]) + [pad_id] * (width - n))
        out["labels"].append(list(ex["labels"]) + [IGNORE] * (width - n))
        out["attention_mask"].append([1] * n + [0] * (width - n))
        out["real_tokens"].append(n)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def per_conversation_loss(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor) -> dict[int, float]:
    """Sum of next-token losses per segment id (segments: [batch, seq] of conversation ids, -1 = none)."""
    tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )
    seg = segments[:, 1:]
    out: dict[int, float] = {}
    for s in seg.unique().tolist():
        if s >= 0:
            out[s] = float(tok[(seg == s) & (labels[:, 1:] != IGNORE)].sum())
    return out


def packing_leak(model) -> float:
    """Largest logit change of a conversation when another is packed before it (0 when packing is exact).

    Runs the model on two short sequences apart and packed into one row with restarting position ids."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 7), generator=g), torch.randint(0, vocab, (1, 5), generator=g)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=b.to(device), use_cache=False).logits[0].float()
        packed_ids = torch.cat([a, b], dim=1).to(device)
        pos = torch.tensor([list(range(7)) + list(range(5))], device=device)
        packed = model(input_ids=packed_ids, position_ids=pos, use_cache=False).logits[0, 7:].float()
    model.train(was_training)
    return float((alone - packed).abs().max())


def check_packing(model, where: str, tolerance: float = 1e-3) -> float:
    """Refuse `packing: true` for a model that attends across packed conversations; returns the measured leak.

    A model whose parameters ZeRO-3 has already partitioned (zero3_init_flag) is checked on a one-layer copy of its
    architecture with the same attention implementation: what is checked is the masking, not the weights."""
    probe = model
    if any(getattr(p, "ds_numel", None) is not None for p in model.parameters()):
        from transformers import AutoModelForCausalLM

        config = model.config.__class__.from_dict(model.config.to_dict())
        config.num_hidden_layers = 1
        probe = AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation)
    leak = packing_leak(probe)
    if not leak <= tolerance:
        impl = getattr(model.config, "_attn_implementation", "?")
        raise ConfigError(
            where,
            "packing",
            f"{type(model).__name__} ({impl} attention) attends across packed conversations (logits change by "
            f"{leak:.3g})",
            "set packing: false, or use a model whose masks follow packed position_ids (Llama, Qwen2, GPT-2)",
        )
    return leak
