"""Exact-match accuracy of greedy answers on held-out conversations.

    em = exact_match(model, tok, heldout_convs, accelerator)   # {"exact_match": 0.93, "correct": 93, "turns": 100}

Every assistant turn of every held-out conversation is one question: the prompt is the conversation before it
(earlier turns with their reference answers) plus the generation prompt, rendered with the chat template; the
answer is the greedy continuation up to the first EOS. It matches when it equals the reference text (stripped of
surrounding whitespace) and the model stopped with EOS within the budget. The questions are split over the ranks;
every rank runs the same number of forward passes (a fixed number of new tokens, batches padded with repeats), so
the prepared model may be a ZeRO-3 engine whose forward gathers parameters collectively.

equal_lengths=True (the recipe passes it under sequence parallelism) batches only prompts of one length, so nothing
is padded: DeepSpeed's Ulysses attention (UlyssesSPAttentionHF.register_with_transformers, 0.19) replaces the
model's sdpa with a wrapper that drops every tensor attention_mask, also in eval mode where disable_in_eval
(DeepSpeed #7823) skips the all-to-all only after that, so a left-padded prompt would attend to its padding (no
upstream issue found; tests/test_sequence_parallel.py::test_greedy_under_ulysses_needs_equal_lengths measures it).
"""

from __future__ import annotations

import torch

from dsrecipes.chat import render_chat


def questions(convs: list[dict]) -> list[tuple[list[dict], str]]:
    """-> [(messages before an assistant turn, its reference answer)] for every assistant turn."""
    out = []
    for conv in convs:
        msgs = conv["messages"]
        out += [(msgs[:i], m["content"]) for i, m in enumerate(msgs) if m["role"] == "assistant"]
    return out


@torch.no_grad()
def greedy(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, device) -> list[list[int]]:
    """Greedy continuation of each prompt for exactly max_new_tokens tokens (left padding, no cache)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, width:].tolist()


def question_batches(lengths: list[int], rank: int, world: int, batch_size: int, equal_lengths: bool) -> list:
    """This rank's questions (every world-th, from its rank) in batches of at most batch_size; with equal_lengths
    each batch holds prompts of one length only (no padding), shortest first."""
    mine = list(range(rank, len(lengths), world))
    if not equal_lengths:
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    by_length: dict[int, list[int]] = {}
    for i in mine:
        by_length.setdefault(lengths[i], []).append(i)
    groups = [by_length[n] for n in sorted(by_length)]
    return [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


def exact_match(
    model,
    tok,
    convs: list[dict],
    accelerator=None,
    batch_size: int = 32,
    max_new_tokens: int = 0,
    equal_lengths: bool = False,
):
    """Held-out exact match; with an accelerator the questions are split over its ranks and the counts summed."""
    qs = questions(convs)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    answers = [tok(a, add_special_tokens=False)["input_ids"] for _, a in qs]
    budget = max_new_tokens or (max(len(a) for a in answers) + 2)  # the longest answer, its EOS, and one spare
    prompts_of = [tok(render_chat(tok, q[0]), add_special_tokens=False)["input_ids"] for q in qs]
    lengths = [len(p) for p in prompts_of]
    batches = question_batches(lengths, rank, world, batch_size, equal_lengths)
    n_batches = max(len(question_batches(lengths, r, world, batch_size, equal_lengths)) for r in range(world))
    mine = [i for b in batches for i in b]
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    correct, samples = 0, []
    for b in range(n_batches):  # the same number on every rank
        idx = batches[b] if b < len(batches) else []
        real = len(idx)
        idx = idx or [0]  # a rank with no questions left still runs the forward passes the others run
        prompts = [prompts_of[i] for i in idx]
        outs = greedy(model, prompts, pad, budget, device)
        for i, out in zip(idx[:real], outs[:real]):
            stopped = eos in out
            text = tok.decode(out[: out.index(eos)] if stopped else out, skip_special_tokens=False)
            hit = stopped and text.strip() == qs[i][1].strip()
            correct += int(hit)
            if len(samples) < 3:
                samples.append({"reference": qs[i][1], "answer": text, "match": hit})
    model.train(was_training)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    c, n = int(counts[0]), int(counts[1])
    return {"exact_match": c / max(n, 1), "correct": c, "turns": n, "max_new_tokens": budget, "samples": samples}
