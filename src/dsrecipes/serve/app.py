"""The HTTP server: an OpenAI-compatible ASGI app over the Batcher, behind the Guard middleware.

    app = Guard(build_app(args, batcher, lm_name, tok, ...), max_body, api_key, metrics)
    serve_forever(app, args, on_listening)       # uvicorn on a socket bound before it starts; SIGTERM drains

Routes: POST /v1/completions (with SSE streaming), POST /v1/embeddings, GET /v1/models, /health and /metrics
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

from dsrecipes.serve.api import APIError, CompletionRequest, EmbeddingRequest, as_prompt_list, validation_error
from dsrecipes.serve.batcher import Batcher
from dsrecipes.serve.engine import GenParams
from dsrecipes.serve.metrics import Metrics

ENDPOINTS = {"/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}


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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        model = pick_model(req.model, lm_name, "completions")
        if req.echo or req.logprobs:
            raise APIError(
                400, "echo and logprobs are not supported.", "echo" if req.echo else "logprobs", "unsupported"
            )
        prompts = as_prompt_list(req.prompt)
        if not 1 <= len(prompts) <= args.max_batch_size:
            raise APIError(400, f"'prompt' must hold 1 to {args.max_batch_size} prompts.", "prompt", "invalid_value")
        ids = [tok.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts]
        ids = [x or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id] for x in ids]
        for x in ids:
            check_ids(x, len(tok), "prompt")
        max_tokens = req.max_tokens or args.default_max_tokens
        if max_tokens > args.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} is above this server's limit {args.max_tokens_limit}.",
                "max_tokens",
                "invalid_value",
            )
        if max(len(x) for x in ids) + max_tokens > max_context:
            raise APIError(
                400,
                f"This model's maximum context length is {max_context} tokens; prompt + max_tokens "
                f"= {max(len(x) for x in ids) + max_tokens}.",
                "max_tokens",
                "context_length_exceeded",
            )
        stop = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        params = GenParams(max_tokens, req.temperature, req.top_p, stop, req.seed)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        n_prompt = sum(len(x) for x in ids)
        metrics.observe("prompt", n_prompt)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(batcher, ids, params, head, n_prompt, usage, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        texts, seqs = [""] * len(ids), [None] * len(ids)
        async for index, delta, finish, seq in batcher.generate(ids, params, stream=False):
            texts[index] += delta
            seqs[index] = seq if finish else seqs[index]
        if any(s.finish_reason == "error" for s in seqs):
            raise APIError(503, "Generation failed on the server; see its log.", None, "generation_failed")
        n_out = sum(len(s.out_ids) for s in seqs)
        metrics.observe("completion", n_out)
        return {
            **head,
            "choices": [
                {"text": t, "index": i, "logprobs": None, "finish_reason": s.finish_reason}
                for i, (t, s) in enumerate(zip(texts, seqs))
            ],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        model = pick_model(req.model, enc_name, "embeddings")
        inputs = as_prompt_list(req.input)
        if not 1 <= len(inputs) <= args.max_batch_size:
            raise APIError(400, f"'input' must hold 1 to {args.max_batch_size} items.", "input", "invalid_value")
        ids = [enc_tok(x)["input_ids"] if isinstance(x, str) else x for x in inputs]
        for x in ids:
            check_ids(x, len(enc_tok), "input", min(args.max_prompt_tokens, enc_context))
        vectors = await batcher.embed(ids)
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


async def _sse(batcher, ids, params, head, n_prompt, include_usage, metrics):
    """Server-sent events: one `data: {chunk}` per text delta, then `data: [DONE]`."""
    t0, first, n_out = time.perf_counter(), True, 0
    async for index, delta, finish, seq in batcher.generate(ids, params):
        if finish == "error":
            err = APIError(503, "Generation failed on the server.", None, "generation_failed")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if first and delta:
            metrics.observe("ttft", time.perf_counter() - t0)
            first = False
        n_out += len(seq.out_ids) if finish else 0
        chunk = {**head, "choices": [{"text": delta, "index": index, "logprobs": None, "finish_reason": finish}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    metrics.observe("completion", n_out)
    if include_usage:
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


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
