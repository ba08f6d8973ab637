"""POST /v1/chat/completions: `messages` rendered with the tokenizer's chat template (dsrecipes.chat picks the
model's own or the default), then generated through the same Batcher / Engine as completions.

    add_chat_route(app, ctx)     # ctx: build_app's helpers (pick_model, refuse, prompt_ids, check_max_tokens, run,
                                 # sse, stop_list, tok, args, metrics, batcher, lm_name)

Supports the completions sampling parameters plus stream (chunks with `delta`, the role in each choice's first),
stream_options.include_usage, stop, seed, max_tokens / max_completion_tokens, n, logprobs / top_logprobs.
Used by dsrecipes.serve.app.
"""

from __future__ import annotations

import time
import uuid

from dsrecipes.chat import render_chat
from dsrecipes.serve.api import APIError, ChatRequest
from dsrecipes.serve.engine import GenParams
from dsrecipes.serve.logprobs import chat_logprobs, kept


def add_chat_route(app, c) -> None:
    tok = c.tok

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        model = c.pick_model(req.model, c.lm_name, "chat completions")
        c.refuse(req)
        if req.n > c.args.max_batch_size:
            raise APIError(400, f"'n' must be 1 to {c.args.max_batch_size}.", "n", "invalid_value")
        try:
            text = render_chat(tok, [m.as_dict() for m in req.messages])
        except Exception as exc:  # noqa: BLE001 - jinja2 TemplateError (e.g. raise_exception in the template)
            raise APIError(400, f"cannot render 'messages': {exc}", "messages", "invalid_value") from None
        ids = c.prompt_ids([text])
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens or c.args.default_max_tokens
        c.check_max_tokens(ids, max_tokens, param)
        stop = c.stop_list(req.stop)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = [
            GenParams(max_tokens, req.temperature, req.top_p, stop, None if req.seed is None else req.seed + j, k)
            for j in range(req.n)
        ]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
        n_prompt = len(ids[0])
        c.metrics.observe("prompt", n_prompt)
        if req.stream:
            started, sent = set(), {}

            def choice(index, delta, finish, seq):
                out = []
                if index not in started:
                    started.add(index)
                    out.append(_chunk(index, {"role": "assistant", "content": ""}))
                lp = None
                if k is not None:
                    start = sent.get(index, 0)
                    records = seq.logprobs[start:]
                    sent[index] = start + len(records)
                    lp = chat_logprobs(tok, records) if records else None
                if delta or lp:
                    out.append({**_chunk(index, {"content": delta}), "logprobs": lp})
                if finish:
                    out.append({**_chunk(index, {}), "finish_reason": finish})
                return out

            gen = c.batcher.generate(ids * req.n, params)
            return c.sse(gen, {**head, "object": "chat.completion.chunk"}, n_prompt, req, choice)
        seqs = await c.run(ids * req.n, params)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": s.text},
                "logprobs": chat_logprobs(tok, kept(tok, s.logprobs, len(s.text) if stop else None))
                if k is not None
                else None,
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(seqs)
        ]
        n_out = sum(len(s.out_ids) for s in seqs)
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }


def _chunk(index: int, delta: dict) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
