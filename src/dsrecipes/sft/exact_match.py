"""Exact-match accuracy of greedy answers on held-out conversations.

    em = exact_match(model, tok, heldout_convs, accelerator)   # {"exact_match": 0.93, "correct": 93, "turns": 100}

Every assistant turn of every held-out conversation is one question: the prompt is the conversation before it
(earlier turns with their reference answers) plus the generation prompt, rendered with the chat template; the
answer is the greedy continuation up to the first EOS. It matches when it equals the reference text (stripped of
surrounding whitespace) and the model stopped with EOS within the budget. The questions are split over the ranks;
every rank runs the same number of forward passes (a fixed number of new tokens, batches padded with repeats), so
the prepared model may be a ZeRO-3 engine whose forward gathers parameters collectively.
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


def exact_match(model, tok, convs: list[dict], accelerator=None, batch_size: int = 32, max_new_tokens: int = 0):
    """Held-out exact match; with an accelerator the questions are split over its ranks and the counts summed."""
    qs = questions(convs)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    answers = [tok(a, add_special_tokens=False)["input_ids"] for _, a in qs]
    budget = max_new_tokens or (max(len(a) for a in answers) + 2)  # the longest answer, its EOS, and one spare
    mine = list(range(rank, len(qs), world))
    n_batches = -(-((len(qs) + world - 1) // world) // batch_size)  # the same on every rank
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    correct, samples = 0, []
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        real = len(idx)
        idx = idx or [0]  # a rank with no questions left still runs the forward passes the others run
        prompts = [tok(render_chat(tok, qs[i][0]), add_special_tokens=False)["input_ids"] for i in idx]
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
