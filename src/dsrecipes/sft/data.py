"""The SFT recipe's data: conversations -> tokenized examples -> packed or padded rows -> data loaders.

    data = build_sft_data(args, tok, where)   # .train (rows), .eval (examples), .heldout (conversations), .info
    train_dl, eval_dl = make_sft_dataloaders(data, args, tok)

dataset 'generated': dsrecipes.sft.generated (the held-out conversations are its own split); a .jsonl file: its
conversations, held out by eval_dataset or else by eval_fraction of the file's conversations (a fixed shuffle).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from dsrecipes.config.errors import ConfigError
from dsrecipes.sft import chat_data, generated, packing


@dataclass
class SftData:
    train: list  # packed rows (lists of examples) with packing, else examples
    eval: list  # held-out examples (always one per row, padded)
    heldout: list  # held-out conversations, for exact match
    info: dict


def load_conversations(args) -> tuple[list[dict], list[dict]]:
    if args.dataset == "generated":
        if not 1 <= args.generated_chat_words <= 160:
            raise ConfigError("<args>", "generated_chat_words", f"{args.generated_chat_words}", "use 1 to 160")
        return generated.generated_chat_split(
            args.generated_conversations,
            args.generated_eval_conversations,
            args.generated_seed,
            args.generated_chat_seed,
            args.generated_chat_words,
        )
    if not args.dataset.endswith(".jsonl"):
        raise ConfigError(
            "<args>", "dataset", f"{args.dataset!r} is not a chat JSONL", "give 'generated' or a .jsonl of messages"
        )
    convs = chat_data.load_chat_jsonl(args.dataset)
    if args.eval_dataset:
        return convs, chat_data.load_chat_jsonl(args.eval_dataset)
    order = list(range(len(convs)))
    random.Random(0).shuffle(order)
    n_eval = max(1, round(len(convs) * args.eval_fraction))
    if n_eval >= len(convs):
        raise ConfigError(args.dataset, "eval_fraction", f"leaves no training conversation of {len(convs)}", "lower it")
    held = set(order[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def build_sft_data(args, tok, where: str) -> SftData:
    train_convs, heldout = load_conversations(args)
    train, info = chat_data.tokenize_conversations(train_convs, tok, args.block_size)
    evl, eval_info = chat_data.tokenize_conversations(heldout, tok, args.block_size)
    if not train:
        raise chat_data.too_long_error(where, info, args.block_size)
    if not evl:
        raise chat_data.too_long_error(where, eval_info, args.block_size)
    heldout = [c for c in heldout if len(chat_data.tokenize_chat(tok, c["messages"])[0]) <= args.block_size]
    rows = packing.pack(train, args.block_size) if args.packing else train
    tokens = sum(len(e["input_ids"]) for e in train)
    info = {
        "train_conversations": len(train),
        "heldout_conversations": len(evl),
        "dropped_too_long": info["dropped_too_long"] + eval_info["dropped_too_long"],
        "first_dropped": info["first_dropped"] or eval_info["first_dropped"],
        "train_tokens": tokens,
        "assistant_tokens": sum(sum(t != chat_data.IGNORE for t in e["labels"]) for e in train),
        "train_rows": len(rows),
        "row_fill": tokens / (len(rows) * args.block_size) if args.packing else None,
    }
    return SftData(train=rows, eval=evl, heldout=heldout, info=info)


def make_sft_dataloaders(data: SftData, args, tok):
    """The loaders of dsrecipes.train.accelerator.make_dataloaders (the loader's own seeded generator, drop_last),
    with the packed or padded collator."""
    from torch.utils.data import DataLoader

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collate = packing.collate_packed if args.packing else packing.collate_padded
    width = collate_width(args)
    train_dl = DataLoader(
        data.train,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=functools.partial(collate, pad_id=pad, width=width),
    )
    eval_dl = DataLoader(
        data.eval,
        batch_size=args.per_device_eval_batch_size,
        shuffle=False,
        collate_fn=functools.partial(packing.collate_padded, pad_id=pad),
    )
    return train_dl, eval_dl


def collate_width(args) -> int | None:
    """The training rows' fixed width: block_size when the frozen-prefix cache is on, which finds a row again only
    if it comes back with the same padding (rows padded to the batch's longest would differ between epochs); under
    sequence parallelism block_size rounded up to a multiple of sequence_parallel_size, as DeepSpeed's
    UlyssesSPDataLoaderAdapter needs: every rank of a group must send it a batch of the same width (gloo's all_gather
    refuses uneven sizes: "ProcessGroupGloo::allgather: invalid tensor size"; NCCL's falls back to broadcasts), and
    the width must divide by sp ("batch's seqlen=97 isn't divisible by sp-size=2"). Else None, the longest row of
    each batch (less padding)."""
    from dsrecipes.config.fields_parallel import sp_size  # the one reader of sequence_parallel_size

    sp = sp_size(args)
    if sp > 1:
        return -(-args.block_size // sp) * sp
    return args.block_size if getattr(args, "freeze_cache", "none") != "none" else None


class TokenCounter:
    """The loss hook's count of non-padding and padding tokens this rank trained on."""

    def __init__(self):
        self.real = self.padding = 0

    def loss(self, model, batch):
        real = int(batch.pop("real_tokens").sum())
        self.real += real
        self.padding += batch["input_ids"].numel() - real
        # use_cache=False: with a cache object transformers skips the packed-sequence mask (masking_utils)
        return model(**batch, use_cache=False).loss, {}

    def totals(self, accelerator) -> tuple[int, int]:
        t = torch.tensor([self.real, self.padding], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, reduction="sum")
        return int(t[0]), int(t[1])
