"""Continuous (iteration-level) batching for causal LMs: a left-padded KV-cache batch that sequences join and
leave between forwards, sampling, stop strings and incremental text.

    engine = Engine(model, tokenizer, max_batch_size=16)
    engine.submit(Sequence(tok.encode("hello"), GenParams(max_tokens=8, temperature=0), emit=callback))
    while engine.busy(): engine.step()        # one forward per step: a prefill of newcomers or one decode token
    seqs = engine.generate(prompts, params)   # offline helper

Tensor parallel: rank 0 wraps its KVBatch in Replicated (broadcasts each call); other ranks run follow(kv).
Used by dsrecipes.serve.batcher.Batcher (recipes/serve.py) and benchmarks/bench_serve.py.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import torch


# ----------------------------------------------------------------------------- the batch that touches the model
class KVBatch:
    """KV cache + attention mask of the running rows (left-padded). Every method is deterministic in its
    arguments, so tensor-parallel followers stay in step by replaying the same calls (see Replicated)."""

    def __init__(self, model, pad_id: int, use_cache: bool = True):
        self.model, self.pad, self.use_cache = model, pad_id, use_cache
        self.cache, self.mask, self.rows = None, None, []  # rows: full token lists (recompute mode)

    def _left_pad(self, rows):
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def _forward(self, ids, mask, cache=None):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        dev = self.model.device
        out = self.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            past_key_values=cache,
            use_cache=self.use_cache,
        )
        return out

    @torch.inference_mode()
    def prefill(self, rows: list[list[int]], score: list | None = None):
        """Append new rows to the batch; -> next-token logits of the new rows. score (one top-k or None per row):
        -> (logits, per row None or prompt_scores(...) of its prompt tokens after the first)."""
        ids, mask = self._left_pad(rows)
        out = self._forward(ids, mask)
        scored = None
        if score is not None:
            scored = [
                None if k is None else prompt_scores(out.logits[i, ids.shape[1] - len(r) :], r, k)
                for i, (r, k) in enumerate(zip(rows, score))
            ]
        if not self.use_cache:
            self.rows += [list(r) for r in rows]
        elif self.cache is None:
            self.cache, self.mask = out.past_key_values, mask
        else:
            self._merge(out.past_key_values, mask)
        last = out.logits[:, -1].float().cpu()
        return last if score is None else (last, scored)

    def _merge(self, new_cache, new_mask):
        width = max(self.mask.shape[1], new_mask.shape[1])

        def pad(t, dim):  # left-pad dim `dim` with zeros up to `width`
            after = t.dim() - 1 - dim % t.dim()
            return torch.nn.functional.pad(t, (0, 0) * after + (width - t.shape[dim], 0))

        for old, new in zip(self.cache.layers, new_cache.layers):
            old.keys = torch.cat([pad(old.keys, -2), pad(new.keys, -2)], 0)
            old.values = torch.cat([pad(old.values, -2), pad(new.values, -2)], 0)
        self.mask = torch.cat([pad(self.mask, 1), pad(new_mask, 1)], 0)

    @torch.inference_mode()
    def decode(self, last: list[int]) -> torch.Tensor:
        """Feed each row's newest token; -> next-token logits of every row."""
        if not self.use_cache:
            for row, t in zip(self.rows, last):
                row.append(t)
            ids, mask = self._left_pad(self.rows)
            return self._forward(ids, mask).logits[:, -1].float().cpu()
        self.mask = torch.cat([self.mask, torch.ones(len(last), 1, dtype=self.mask.dtype)], 1)
        out = self._forward(torch.tensor(last)[:, None], self.mask, self.cache)
        self.cache = out.past_key_values
        return out.logits[:, -1].float().cpu()

    def keep(self, idx: list[int]) -> None:
        """Drop finished rows, then the left columns that are padding in every remaining row."""
        if not idx:
            self.cache, self.mask, self.rows = None, None, []
            return
        if not self.use_cache:
            self.rows = [self.rows[i] for i in idx]
            return
        sel = torch.tensor(idx)
        self.mask = self.mask[sel]
        cut = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        self.mask = self.mask[:, cut:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[sel][..., cut:, :], layer.values[sel][..., cut:, :]


def prompt_scores(logits: torch.Tensor, ids: list[int], k: int) -> list:
    """Logits of one unpadded row -> [(token, logprob, [(id, logprob)] * k)] for ids[1:] (teacher forced)."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    target = torch.tensor(ids[1:], device=logp.device)
    chosen = logp.gather(-1, target[:, None])[:, 0].cpu().tolist()
    if k:
        vals, idx = logp.topk(min(k, logp.shape[-1]), -1)
        tops = [list(zip(i, v)) for i, v in zip(idx.cpu().tolist(), vals.cpu().tolist())]
    else:
        tops = [[] for _ in chosen]
    return list(zip(ids[1:], chosen, tops))


def token_score(logits: torch.Tensor, token: int, k: int) -> tuple:
    """One next-token logits row -> (token, logprob, [(id, logprob)] * k)."""
    logp = torch.log_softmax(logits.float(), -1)
    top = []
    if k:
        vals, idx = logp.topk(min(k, logp.shape[-1]))
        top = list(zip(idx.tolist(), vals.tolist()))
    return token, float(logp[token]), top


def supports_kv_merge(model) -> bool:
    """Continuous batching edits the cache tensors; only plain DynamicCache layers allow that."""
    from transformers.cache_utils import DynamicLayer

    with torch.inference_mode():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class Replicated:
    """Rank 0's view of a KVBatch under tensor parallelism: broadcast each call, then run it locally."""

    def __init__(self, kv: KVBatch):
        self.kv = kv

    def __getattr__(self, name):
        import torch.distributed as dist

        def call(*a):
            dist.broadcast_object_list([(name, a)], src=0)
            return getattr(self.kv, name)(*a)

        return call


def follow(kv: KVBatch) -> None:
    """Ranks > 0: replay rank 0's KVBatch calls until it broadcasts ('stop', ())."""
    import torch.distributed as dist

    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        name, a = box[0]
        if name == "stop":
            return
        getattr(kv, name)(*a)


# ----------------------------------------------------------------------------- continuous batching
@dataclass
class GenParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # top-k alternatives recorded per generated token (0: the chosen token only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); max_tokens may then be 0


class Sequence:
    """One prompt being generated. `emit(seq, delta_text)` is called from the engine's thread: after every new
    piece of text when `incremental` (streaming), else once, when the sequence finishes."""

    def __init__(self, prompt_ids: list[int], params: GenParams, emit=None, index: int = 0, incremental: bool = True):
        self.prompt_ids, self.params, self.emit, self.index = list(prompt_ids), params, emit, index
        self.incremental = incremental
        self.out_ids: list[int] = []
        self.text, self.sent, self.finish_reason, self.cancelled = "", 0, None, False
        self.logprobs: list[tuple] = []  # (token, logprob, top) per generated token, when params.logprobs is set
        self.prompt_logprobs: list[tuple] | None = None  # the same for prompt_ids[1:], when params.prompt_logprobs
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))


class Engine:
    """Iteration-level batching: each step() is one forward, either a prefill of newly admitted sequences
    (joining the running batch) or one decode token for every running sequence. Short requests join a
    long one's batch at the next step and leave when done, so nobody waits for the longest."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_context: int | None = None, kv=None):
        self.tok, self.max_batch = tokenizer, max_batch_size
        self.eos = tokenizer.eos_token_id
        self.max_context = (
            max_context
            or getattr(model.config, "n_positions", None)
            or getattr(model.config, "max_position_embeddings", 1 << 30)
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.kv = kv if kv is not None else KVBatch(model, pad, use_cache=supports_kv_merge(model))
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def step(self) -> dict:
        """-> {'kind': 'prefill'|'decode'|'idle', 'batch': rows in the forward}."""
        self._retire([i for i, s in enumerate(self.active) if s.cancelled])
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
        room = self.max_batch - len(self.active)
        if self.waiting and room > 0:
            new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            score = [s.params.prompt_logprobs for s in new]
            if any(k is not None for k in score):
                logits, scored = self.kv.prefill([s.prompt_ids for s in new], score)
                for s, sc in zip(new, scored):
                    s.prompt_logprobs = sc
            else:
                logits = self.kv.prefill([s.prompt_ids for s in new])
            self.active += new
            kind, rows = "prefill", new
        elif self.active:
            logits = self.kv.decode([s.out_ids[-1] for s in self.active])
            kind, rows = "decode", self.active
        else:
            return {"kind": "idle", "batch": 0}
        for seq, row in zip(rows, logits):
            if seq.params.max_tokens == 0:  # echo scoring only: nothing to generate
                seq.finish_reason = "length"
                if seq.emit:
                    seq.emit(seq, "")
                continue
            token = _sample(row, seq.params, seq.gen)
            if seq.params.logprobs is not None:  # EOS too: harnesses drop the last token of echo + max_tokens 1
                seq.logprobs.append(token_score(row, token, seq.params.logprobs))
            self._advance(seq, token)
        self._retire([i for i, s in enumerate(self.active) if s.finish_reason])
        return {"kind": kind, "batch": len(rows)}

    def _advance(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if token == self.eos:
            seq.finish_reason = "stop"
        else:
            seq.out_ids.append(token)
            if len(seq.out_ids) >= p.max_tokens or len(seq.prompt_ids) + len(seq.out_ids) >= self.max_context:
                seq.finish_reason = "length"
        if not (seq.incremental or p.stop or seq.finish_reason):
            return  # not streamed and no stop strings: decode once, at the end
        seq.text = self.tok.decode(seq.out_ids, skip_special_tokens=True)
        hits = [i for i in (seq.text.find(s) for s in p.stop) if i >= 0]
        if hits:
            seq.text, seq.finish_reason = seq.text[: min(hits)], "stop"
        end = len(seq.text)
        if not seq.finish_reason:  # hold back a partial UTF-8 char and a possible stop-string prefix
            end -= max([len(s) - 1 for s in p.stop] + [0])
            held = 0  # a UTF-8 character is at most 4 bytes: hold back up to 3 undecodable ones
            while end > seq.sent and seq.text[end - 1] == "\ufffd" and held < 3:
                end, held = end - 1, held + 1
        if not (seq.incremental or seq.finish_reason):
            return  # not streamed: nothing is sent before the end, and the end sends the whole text
        if seq.emit and (seq.finish_reason or end > seq.sent):
            seq.emit(seq, seq.text[seq.sent : max(end, seq.sent)])
        seq.sent = max(end, seq.sent)

    def _retire(self, done: list[int]) -> None:
        if done:
            keep = [i for i in range(len(self.active)) if i not in set(done)]
            self.kv.keep(keep)
            self.active = [self.active[i] for i in keep]

    def generate(self, prompts: list[list[int]], params: GenParams) -> list[Sequence]:
        """Offline helper (benchmarks, tests): run prompts to completion."""
        seqs = [Sequence(p, params, incremental=False) for p in prompts]
        for s in seqs:
            self.submit(s)
        while self.busy():
            self.step()
        return seqs


def _sample(logits: torch.Tensor, p: GenParams, gen: torch.Generator) -> int:
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, -1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = (sorted_p.cumsum(-1) - sorted_p) >= p.top_p  # keep the smallest prefix reaching top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
