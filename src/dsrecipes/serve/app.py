"""The HTTP server: an OpenAI-compatible ASGI app over the Batcher, behind the Guard middleware.

    app = Guard(build_app(args, batcher, lm_name, tok, ...), max_body, api_key, metrics)
    serve_forever(app, args, on_listening)       # uvicorn on a socket bound before it starts; SIGTERM drains

Routes: POST /v1/completions and /v1/chat/completions (dsrecipes.serve.chat; SSE streaming, logprobs, echo),
POST /v1/embeddings, GET /v1/models, /health and /metrics
(Prometheus). The Guard checks the API key on /v1/* and /metrics, caps the request body (413) and counts every
request. Used by recipes/serve.py.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace

from dsrecipes.serve.api import APIError, CompletionRequest, EmbeddingRequest, as_prompt_list, validation_error
from dsrecipes.serve.batcher import Batcher
from dsrecipes.serve.chat import add_chat_route
from dsrecipes.serve.engine import GenParams
from dsrecipes.serve.logprobs import chunk_logprobs, completion_logprobs
from dsrecipes.serve.metrics import Metrics

ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}


# ----------------------------------------------------------------------------- guard: auth, body cap, metrics
class Guard:
    """ASGI middleware: API key on /v1/* and /metrics, request-body cap (413), per-request metrics."""

    def __init__(self, app, max_body: int, api_key: str | None, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, state = scope["path"], time.perf_counter(), {}
        endpoint = path if path in ENDPOINTS else "other"

        async def send_and_count(msg):
            if msg["type"] == "http.response.start":
                state["code"] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body"):
                self.metrics.request(endpoint, state.get("code", 0), time.perf_counter() - t0)
            await send(msg)

        headers = dict(scope["headers"])
        if self.key and (path.startswith("/v1/") or path == "/metrics"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                return await _send_error(
                    send_and_count,
                    APIError(
                        401, "Incorrect or missing API key (send Authorization: Bearer <key>).", None, "invalid_api_key"
                    ),
                )
        too_big = APIError(413, f"Request body larger than {self.max_body} bytes.", None, "body_too_large")
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body:
            return await _send_error(send_and_count, too_big)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:  # read the whole (capped) body, then replay it to the app
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(send_and_count, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: disconnect notices for streaming responses

        await self.app(scope, replay, send_and_count)


async def _send_error(send, err: APIError):
    payload = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def served_name(path: str) -> str:
    """The name clients pass as `model`: run/final, run/step_N, or the directory name."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-1] == "final" or parts[-1].startswith("step_") or parts[-1] == "checkpoints":
        return "/".join(p for p in parts[-3:] if p != "checkpoints")
    return parts[-1]


# ----------------------------------------------------------------------------- the app
def build_app(args, batcher: Batcher, lm_name, tok, max_context, enc_name, enc_tok, enc_context, metrics: Metrics):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.close(timeout=args.shutdown_timeout_s)  # requests in flight already finished (uvicorn waits)

    app = FastAPI(title="dsrecipes serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        err = APIError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            None,
            "not_found" if exc.status_code == 404 else None,
        )
        return JSONResponse(err.body(), status_code=err.status)

    def pick_model(requested, served, kind):
        if served is None or (requested is not None and requested != served):
            known = [n for n in (lm_name, enc_name) if n]
            if requested in known:
                raise APIError(400, f"Model '{requested}' does not serve {kind}.", "model", "model_not_supported")
            raise APIError(
                404, f"The model '{requested}' does not exist (served: {known}).", "model", "model_not_found"
            )
        return served

    def check_ids(ids, vocab, param, limit=args.max_prompt_tokens):
        if not ids:
            raise APIError(400, f"'{param}' must not be empty.", param, "invalid_value")
        if len(ids) > limit:
            raise APIError(
                400, f"'{param}' has {len(ids)} tokens; the limit is {limit}.", param, "context_length_exceeded"
            )
        if max(ids) >= vocab:
            raise APIError(400, f"token id {max(ids)} is outside the vocabulary ({vocab}).", param, "invalid_value")

    def refuse(req):
        bad = req.refused()
        if bad:
            raise APIError(400, f"'{bad}' is not supported by this server.", bad, "unsupported_parameter")

    def prompt_ids(prompts) -> list[list[int]]:
        ids = [tok.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts]
        ids = [x or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id] for x in ids]
        for x in ids:
            check_ids(x, len(tok), "prompt")
        return ids

    def check_max_tokens(ids, max_tokens, param="max_tokens"):
        if max_tokens > args.max_tokens_limit:
            raise APIError(
                400,
                f"{param} {max_tokens} is above this server's limit {args.max_tokens_limit}.",
                param,
                "invalid_value",
            )
        if max(len(x) for x in ids) + max_tokens > max_context:
            raise APIError(
                400,
                f"This model's maximum context length is {max_context} tokens; prompt + {param} "
                f"= {max(len(x) for x in ids) + max_tokens}.",
                param,
                "context_length_exceeded",
            )

    async def run(ids, params):
        """-> finished Sequences (non-streamed), in prompt order; a failed generation is a 503."""
        seqs = [None] * len(ids)
        async for index, _, finish, seq in batcher.generate(ids, params, stream=False):
            seqs[index] = seq if finish else seqs[index]
        if any(s.finish_reason == "error" for s in seqs):
            raise APIError(503, "Generation failed on the server; see its log.", None, "generation_failed")
        metrics.observe("completion", sum(len(s.out_ids) for s in seqs))
        return seqs

    def stop_list(stop):
        return [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]

    def sse(gen, head, n_prompt, req, choice_fn):
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(gen, head, n_prompt, usage, metrics, choice_fn),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        model = pick_model(req.model, lm_name, "completions")
        refuse(req)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (scoring the prompt).", "max_tokens", "invalid_value")
        if req.echo and req.stream:
            raise APIError(400, "echo cannot be streamed; set stream: false.", "echo", "unsupported_parameter")
        prompts = as_prompt_list(req.prompt)
        if not 1 <= len(prompts) <= args.max_batch_size:
            raise APIError(400, f"'prompt' must hold 1 to {args.max_batch_size} prompts.", "prompt", "invalid_value")
        ids = prompt_ids(prompts)
        max_tokens = req.max_tokens if req.max_tokens is not None else args.default_max_tokens
        check_max_tokens(ids, max_tokens)
        stop = stop_list(req.stop)
        scored = req.logprobs if req.echo else None
        params = GenParams(max_tokens, req.temperature, req.top_p, stop, req.seed, req.logprobs, scored)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        n_prompt = sum(len(x) for x in ids)
        metrics.observe("prompt", n_prompt)
        if req.stream:
            sent = {}

            def choice(index, delta, finish, seq):
                lp = None
                if req.logprobs is not None:
                    start = sent.get(index, 0)
                    lp = chunk_logprobs(tok, seq.logprobs[start:], len(seq.text) - len(delta))
                    sent[index] = start + len(lp["tokens"])
                return {"text": delta, "index": index, "logprobs": lp, "finish_reason": finish}

            return sse(batcher.generate(ids, params), head, n_prompt, req, choice)
        seqs = await run(ids, params)
        choices = []
        for i, (p, x, s) in enumerate(zip(prompts, ids, seqs)):
            shown = (p if isinstance(p, str) else tok.decode(x, skip_special_tokens=True)) if req.echo else ""
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(tok, x, s, req.echo, len(s.text) if stop else None)
            choices.append({"text": shown + s.text, "index": i, "logprobs": lp, "finish_reason": s.finish_reason})
        n_out = sum(len(s.out_ids) for s in seqs)
        return {
            **head,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }

    if lm_name:
        add_chat_route(app, SimpleNamespace(**locals()))

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        model = pick_model(req.model, enc_name, "embeddings")
        inputs = as_prompt_list(req.input)
        if not 1 <= len(inputs) <= args.max_batch_size:
            raise APIError(400, f"'input' must hold 1 to {args.max_batch_size} items.", "input", "invalid_value")
        cut = getattr(enc_tok, "dsrecipes_truncate", False)  # sentence-transformers models: at max_seq_length
        ids = [enc_tok(x, truncation=cut)["input_ids"] if isinstance(x, str) else x for x in inputs]
        for x in ids:
            check_ids(x, len(enc_tok), "input", min(args.max_prompt_tokens, enc_context))
        vectors = await batcher.embed(ids)
        if req.dimensions is not None and req.dimensions != len(vectors[0]):
            raise APIError(
                400,
                f"'dimensions' {req.dimensions}: this model only gives {len(vectors[0])}-dimensional vectors "
                "(it is not trained for truncation).",
                "dimensions",
                "unsupported_parameter",
            )
        n = sum(len(x) for x in ids)
        metrics.observe("embedding", n)
        import numpy as np

        enc = (
            (lambda v: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode())
            if req.encoding_format == "base64"
            else (lambda v: v)
        )
        return {
            "object": "list",
            "model": model,
            "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(vectors)],
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "dsrecipes"} for n in (lm_name, enc_name) if n
            ],
        }

    @app.get("/health")
    async def health():
        ok = batcher.error is None and batcher.thread.is_alive()
        body = {
            "status": "ok" if ok else "error",
            "models": [n for n in (lm_name, enc_name) if n],
            "queue_depth": batcher.queue_depth(),
            "running": metrics.running(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _sse(gen, head, n_prompt, include_usage, metrics, choice_fn):
    """Server-sent events: one `data: {chunk}` per text delta (choice_fn builds its choice), then `data: [DONE]`;
    include_usage: every chunk carries usage null, and a last one has `choices: []` and the usage."""
    t0, first, n_out = time.perf_counter(), True, 0
    extra = {"usage": None} if include_usage else {}
    async for index, delta, finish, seq in gen:
        if finish == "error":
            err = APIError(503, "Generation failed on the server.", None, "generation_failed")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if first and delta:
            metrics.observe("ttft", time.perf_counter() - t0)
            first = False
        n_out += len(seq.out_ids) if finish else 0
        for choice in _as_list(choice_fn(index, delta, finish, seq)):
            yield f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"
    metrics.observe("completion", n_out)
    if include_usage:
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def _as_list(x):
    return x if isinstance(x, list) else [x]


# ----------------------------------------------------------------------------- uvicorn
def serve_forever(app, args, on_listening) -> None:
    """Bind host:port (port 0: any free one), call on_listening("http://HOST:PORT") once connections wait in the
    backlog, run uvicorn until SIGTERM/SIGINT, then let the requests in flight finish."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout_s,
            lifespan="on",
            access_log=args.log_level in ("info", "debug"),
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its graceful shutdown
        signal.signal(sig, lambda *_: None)
    sock.listen(2048)  # connections made from now on wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    on_listening(f"http://{host}:{port}")
    server.run(sockets=[sock])
