"""Data for every recipe: an offline byte tokenizer, a learnable generated corpus, and `datasets` loading.

    tok = load_tokenizer(model_args)                       # model dir's tokenizer, or the byte tokenizer
    train_ds, eval_ds, info = build_lm_datasets(data_args, tok)   # tokenized, grouped into blocks

Sources: 'generated' (default, no network), a local .txt/.json/.jsonl/.parquet file, or a hub dataset name
(needs a network; the same `datasets.load_dataset` call users already know).
"""

from __future__ import annotations

import math
import os
from collections import Counter

from dsrecipes.config.errors import ConfigError
from dsrecipes.train.corpus import Language, generated_corpus, generated_split  # noqa: F401  (re-exported)

EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------- tokenizer
def byte_tokenizer():
    """A 257-token byte-level tokenizer (256 bytes + <|endoftext|>): works on any text, fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte-to-unicode table, in byte order, so ids 0..255 are the raw bytes.
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=1 << 20
    )


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def load_tokenizer(tokenizer_name_or_path: str | None, model_name_or_path: str | None = None):
    from transformers import AutoTokenizer

    for src in (tokenizer_name_or_path, model_name_or_path):
        if not src:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as exc:  # noqa: BLE001 - any load failure is a user-fixable input problem
            if src is tokenizer_name_or_path:
                raise ConfigError(
                    "<args>",
                    "tokenizer_name_or_path",
                    f"cannot load tokenizer {src!r} ({type(exc).__name__})",
                    "give a directory with tokenizer.json, or a hub name with a network",
                ) from None
            continue  # model dir without a tokenizer: fall back to the byte tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return byte_tokenizer()


# ----------------------------------------------------------------------------- generated corpus
# ----------------------------------------------------------------------------- datasets
def _load_raw(args):
    """-> (train Dataset, eval Dataset) with a text column."""
    import datasets

    if args.dataset == "generated":
        train, evl = generated_split(args.generated_docs, args.eval_docs, args.generated_seed)
        return datasets.Dataset.from_dict({"text": train}), datasets.Dataset.from_dict({"text": evl}), "text"
    path = args.dataset
    ext = os.path.splitext(path)[1].lower()
    builders = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if ext in builders or os.path.exists(path):
        if not os.path.isfile(path):
            raise ConfigError("<args>", "dataset", f"file not found: {path!r}", "give an existing file, or 'generated'")
        if ext not in builders:
            raise ConfigError("<args>", "dataset", f"unsupported file type {ext!r}", f"use one of {sorted(builders)}")
        try:
            ds = datasets.load_dataset(builders[ext], data_files={"train": path}, split="train")
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                "<args>",
                "dataset",
                f"cannot read {path!r} ({type(exc).__name__}: {str(exc)[:120]})",
                "check the file's format",
            ) from None
    else:
        try:
            dd = datasets.load_dataset(path, args.dataset_config)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                "<args>",
                "dataset",
                f"cannot load hub dataset {path!r} ({type(exc).__name__})",
                "give a local file, 'generated', or a hub name with a network (HF_DATASETS_OFFLINE=0)",
            ) from None
        if "validation" in dd:
            return dd["train"], dd["validation"], _text_column(dd["train"], args)
        ds = dd["train"]
    col = _text_column(ds, args)
    split = ds.train_test_split(test_size=args.eval_fraction, seed=0)
    return split["train"], split["test"], col


def _text_column(ds, args) -> str:
    if args.text_column not in ds.column_names:
        raise ConfigError(
            "<args>",
            "text_column",
            f"{args.text_column!r} is not a column (columns: {ds.column_names})",
            "set text_column to the column holding the text",
        )
    return args.text_column


def tokenize_and_group(ds, tokenizer, text_column: str, block_size: int):
    """Tokenize, join documents with EOS, cut into blocks of block_size; labels = input_ids."""
    eos = tokenizer.eos_token_id

    def tok(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    def group(batch):
        flat = [t for x in batch["ids"] for t in x]
        n = (len(flat) // block_size) * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    ds = ds.map(tok, batched=True, remove_columns=ds.column_names, desc="tokenize")
    return ds.map(group, batched=True, remove_columns=["ids"], desc="group")


def unigram_entropy(ds) -> float:
    """Entropy (nats) of the token unigram distribution: the loss of a model that ignores context."""
    counts = Counter(t for row in ds["input_ids"] for t in row)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def entropy_rate(args, texts: list[str], tokenizer) -> float:
    """Nats per token of the generated language's Bayes-optimal model (dsrecipes.train.corpus): exact per byte,
    scaled by this tokenizer's bytes per token on `texts` (1.0 for the byte tokenizer)."""
    tokens = sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    n_bytes = sum(len(t.encode()) + 1 for t in texts)
    return Language(args.generated_seed).entropy_rate_per_byte() * n_bytes / tokens


def build_lm_datasets(args, tokenizer):
    """-> (train, eval, info) tokenized and grouped into blocks, torch-formatted."""
    if args.block_size < 8:
        raise ConfigError("<args>", "block_size", f"{args.block_size} is too small", "use at least 8")
    raw_train, raw_eval, col = _load_raw(args)
    train = tokenize_and_group(raw_train, tokenizer, col, args.block_size)
    evl = tokenize_and_group(raw_eval, tokenizer, col, args.block_size)
    if len(train) == 0 or len(evl) == 0:
        raise ConfigError(
            "<args>",
            "dataset",
            f"too little text for one block of {args.block_size} tokens",
            "use more data or a smaller block_size",
        )
    info = {
        "train_blocks": len(train),
        "eval_blocks": len(evl),
        "block_size": args.block_size,
        "unigram_entropy": unigram_entropy(train),
        "entropy_rate": entropy_rate(args, raw_train[:200][col], tokenizer) if args.dataset == "generated" else None,
    }
    train.set_format("torch")
    evl.set_format("torch")
    return train, evl, info
