"""Log-probabilities in the OpenAI response shapes, from the engine's (token, logprob, top) records.

    completion_logprobs(tok, prompt_ids, seq, echo=True, text_len=len(text))
        -> {"tokens", "token_logprobs", "top_logprobs", "text_offset"}   (completions; the prompt's first is null)
    chat_logprobs(tok, seq.logprobs[a:b]) -> {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}

Records come from dsrecipes.serve.engine (prompt_scores / token_score). Used by dsrecipes.serve.app and .chat.
"""

from __future__ import annotations


def token_bytes(tok, token: int) -> bytes:
    """The raw bytes of one token: byte-level BPE tokens map back through GPT-2's byte alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = tok.decode([token], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text.encode("utf-8")
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    raw = tok.convert_ids_to_tokens(token) or ""
    return bytes(inverse[c] for c in raw) if raw and all(c in inverse for c in raw) else text.encode("utf-8")


def _piece(tok, token: int) -> str:
    """A token as text; a piece of a multi-byte character as `bytes:\\xNN` (what OpenAI's API returns)."""
    raw = token_bytes(tok, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _offsets(tok, ids: list[int], start: int = 0) -> list[int]:
    """Character offset of each of ids in decode(ids), plus `start` (prefix decoding: a byte of a multi-byte
    character sits where the character starts)."""
    return [start + len(tok.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]


def completion_logprobs(tok, prompt_ids: list[int], seq, echo: bool, text_len: int | None = None) -> dict:
    """The `logprobs` object of one completions choice: the prompt's tokens first when echo (the first token has
    no logprob: null), then the generated ones; tokens past a stop string (text_len) are left out."""
    records = list(seq.logprobs)
    tokens, lps, tops, offsets = [], [], [], []
    if echo:
        scored = seq.prompt_logprobs or []
        tokens = [_piece(tok, t) for t in prompt_ids]
        lps = [None] + [lp for _, lp, _ in scored]
        tops = [None] + [{_piece(tok, i): v for i, v in top} for _, _, top in scored]
        offsets = _offsets(tok, prompt_ids)
    prompt_len = len(tok.decode(prompt_ids, skip_special_tokens=True)) if echo else 0
    gen_ids = [t for t, _, _ in records]
    gen_off = _offsets(tok, gen_ids, prompt_len)
    for (t, lp, top), off in zip(records, gen_off):
        if text_len is not None and off - prompt_len >= text_len:
            break  # cut off by a stop string
        tokens.append(_piece(tok, t))
        lps.append(lp)
        tops.append({_piece(tok, i): v for i, v in top})
        offsets.append(off)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok, records: list[tuple]) -> dict:
    """The `logprobs` object of a chat choice (or stream chunk) for these generated-token records."""

    def entry(t, lp):
        return {"token": _piece(tok, t), "logprob": lp, "bytes": list(token_bytes(tok, t))}

    return {
        "content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in records],
        "refusal": None,
    }


def kept(tok, records: list[tuple], text_len: int | None) -> list[tuple]:
    """The records whose text starts before text_len (a stop string cut the text there); all when None."""
    if text_len is None:
        return list(records)
    offsets = _offsets(tok, [t for t, _, _ in records])
    return [r for r, off in zip(records, offsets) if off < text_len]


def chunk_logprobs(tok, records: list[tuple], start: int) -> dict:
    """A streamed completions chunk's `logprobs` for these newly generated records (text offsets from start)."""
    ids = [t for t, _, _ in records]
    return {
        "tokens": [_piece(tok, t) for t in ids],
        "token_logprobs": [lp for _, lp, _ in records],
        "top_logprobs": [{_piece(tok, i): v for i, v in top} for _, _, top in records],
        "text_offset": _offsets(tok, ids, start),
    }
