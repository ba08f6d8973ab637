"""Chat data: JSONL `messages` loading and validation, and tokenizing with the chat template and assistant-only labels.

    convs = load_chat_jsonl("data/chat_example.jsonl")   # [{"messages": [...], "where": "FILE:LINE"}, ...]
    ids, labels = tokenize_chat(tok, convs[0]["messages"])
    examples, info = tokenize_conversations(convs, tok, block_size=256)

One JSON object per line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. The text is
rendered with dsrecipes.chat.chat_template(tok) (the tokenizer's own template when it has one, else the default).
Labels are the token ids of each assistant turn's content and of the EOS that ends it; everything else (system and
user turns, role markers, the generation prompt, the newline after EOS) is -100. A conversation longer than
block_size tokens is dropped, not truncated (a truncated answer would teach the model to stop mid-answer): the
count is in info["dropped_too_long"] and the summary, and the first one is named in info["first_dropped"].
"""

from __future__ import annotations

import json
import os

from dsrecipes.chat import ROLES, chat_template
from dsrecipes.config.errors import ConfigError

IGNORE = -100


def load_chat_jsonl(path: str) -> list[dict]:
    """Read and validate a chat JSONL; a bad line raises ConfigError naming FILE:LINE, the key and the fix."""
    if not os.path.isfile(path):
        raise ConfigError("<args>", "dataset", f"file not found: {path!r}", "give an existing .jsonl, or 'generated'")
    convs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(where, "-", f"not JSON ({exc.msg})", "write one JSON object per line") from None
            convs.append({"messages": validate_messages(obj, where), "where": where})
    if not convs:
        raise ConfigError(path, "-", "no conversations", 'write one {"messages": [...]} object per line')
    return convs


def validate_messages(obj, where: str) -> list[dict]:
    """The `messages` list of one conversation, checked: roles, string contents, at least one assistant turn."""
    fix_shape = 'write {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    if not isinstance(obj, dict) or "messages" not in obj:
        raise ConfigError(where, "messages", "missing", fix_shape)
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise ConfigError(where, "messages", f"expected a list, got {type(messages).__name__}", fix_shape)
    if not messages:
        raise ConfigError(where, "messages", "empty conversation", "give at least a user and an assistant turn")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ConfigError(where, f"messages[{i}]", "needs a role and a string content", fix_shape)
        if m.get("role") not in ROLES:
            raise ConfigError(where, f"messages[{i}].role", f"unknown role {m.get('role')!r}", f"use one of {ROLES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(where, "messages", "no assistant turn", "add an assistant turn: only assistant tokens train")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(
        messages, chat_template=chat_template(tok), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end)] of each assistant turn's content plus the EOS right after it, as characters).

    Each span starts where the text rendered up to the turn with the generation prompt ends: the template must render
    a conversation's prefix as a prefix of its text (all common templates do; one that does not is refused)."""
    text = _render(tok, messages, add_generation_prompt=False)
    eos = tok.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
        if not text.startswith(prompt):
            raise ConfigError(
                "<tokenizer>",
                "chat_template",
                "renders a conversation's first turns differently from the whole conversation",
                "use a template whose output for messages[:i] plus the generation prompt is a prefix of the full text",
            )
        start = len(prompt)
        while not text.startswith(m["content"], start) and start < len(text) and text[start].isspace():
            start += 1  # templates that put whitespace between the generation prompt and the answer
        if not text.startswith(m["content"], start):
            raise ConfigError(
                "<tokenizer>",
                "chat_template",
                "does not put the assistant content right after the generation prompt",
                "use a template that renders the assistant content verbatim after its prompt",
            )
        end = start + len(m["content"])
        if eos and text.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return text, spans


def tokenize_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels): labels are the ids of the assistant spans (assistant_char_spans), -100 elsewhere."""
    text, spans = assistant_char_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tid, (a, b) in zip(ids, offsets):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        labels.append(tid if inside else IGNORE)
    return list(ids), labels


def tokenize_conversations(convs: list[dict], tok, block_size: int) -> tuple[list[dict], dict]:
    """-> ([{"input_ids", "labels"}], info). Conversations over block_size tokens are dropped and counted."""
    examples, dropped, first = [], 0, None
    for conv in convs:
        ids, labels = tokenize_chat(tok, conv["messages"])
        if len(ids) > block_size:
            dropped += 1
            first = first or f"{conv.get('where', 'generated')} ({len(ids)} tokens)"
            continue
        examples.append({"input_ids": ids, "labels": labels})
    info = {"conversations": len(convs), "dropped_too_long": dropped, "first_dropped": first}
    return examples, info


def too_long_error(where: str, info: dict, block_size: int) -> ConfigError:
    return ConfigError(
        where,
        "block_size",
        f"all {info['conversations']} conversations are over {block_size} tokens (first: {info['first_dropped']})",
        "raise block_size or shorten the conversations",
    )
