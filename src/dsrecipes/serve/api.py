"""HTTP side of serving: OpenAI request schemas and error bodies, Prometheus metrics, and the Batcher that feeds
concurrent requests into one model thread (dynamic + iteration-level batching, see dsrecipes.serve.loading.Engine).

    batcher = Batcher(engine, encoder=(model, tok), max_wait_ms=10, max_queue=256, metrics=Metrics())
    batcher.start()
    async for index, delta, finish in batcher.generate([[1, 2, 3]], GenParams(max_tokens=8)): ...
    vectors, n_tokens = await batcher.embed(["some text"])

Used by recipes/serve.py; the schemas and the metrics text format are also what dsrecipes.serve.loadgen and
benchmarks/bench_serve.py read.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
import traceback
from collections import defaultdict
from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from dsrecipes.serve.engine import Engine, GenParams, Sequence
from dsrecipes.serve.loading import embed


# ----------------------------------------------------------------------------- schemas (OpenAI API)
class _Strict(BaseModel):
    # strict: "8" is not an int and 8.5 is not an int; unknown fields are ignored like OpenAI's SDKs expect
    model_config = ConfigDict(strict=True, extra="ignore")


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Strict):
    model: Optional[str] = None
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=4)]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    echo: bool = False
    logprobs: Optional[Annotated[int, Field(le=0)]] = None
    user: Optional[str] = None


class EmbeddingRequest(_Strict):
    model: Optional[str] = None
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Annotated[str, Field(pattern="^(float|base64)$")] = "float"
    user: Optional[str] = None


def as_prompt_list(value) -> list:
    """OpenAI's four prompt/input shapes -> a list of str or token-id lists."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)


class APIError(Exception):
    """-> HTTP status + OpenAI error body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(exc) -> APIError:
    """pydantic/FastAPI validation errors -> one 400 naming the first bad field."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.", None, "invalid_json")
    param = loc[0] if loc else None
    return APIError(
        400,
        f"Invalid value for '{'.'.join(loc) or 'body'}': {first.get('msg', 'invalid request')}",
        param,
        "invalid_value",
    )


# ----------------------------------------------------------------------------- metrics (Prometheus text)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Hist:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {acc}')
        tail = f"{{{labels}}}" if labels else ""
        out += [
            f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}',
            f"{name}_sum{tail} {self.sum:.6f}",
            f"{name}_count{tail} {self.n}",
        ]
        return out


class Metrics:
    """Thread-safe counters and histograms, rendered by hand in the Prometheus text format (version 0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count
        self.latency = defaultdict(lambda: _Hist(LATENCY_BUCKETS))  # endpoint -> seconds
        self.ttft = _Hist(LATENCY_BUCKETS)
        self.batch = defaultdict(lambda: _Hist(BATCH_BUCKETS))  # kind (prefill/decode/embed) -> rows per forward
        self.tokens = defaultdict(int)  # prompt / completion / embedding
        self.queue_depth = lambda: 0
        self.running = lambda: 0

    def request(self, endpoint: str, status: int, seconds: float | None) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency[endpoint].observe(seconds)

    def observe(self, what: str, value: float, kind: str = "") -> None:
        with self.lock:
            if what == "batch":
                self.batch[kind].observe(value)
            elif what == "ttft":
                self.ttft.observe(value)
            else:
                self.tokens[what] += int(value)

    def render(self) -> str:
        with self.lock:
            out = [
                "# HELP dsrecipes_requests_total HTTP requests by endpoint and status code.",
                "# TYPE dsrecipes_requests_total counter",
            ]
            out += [
                f'dsrecipes_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.requests.items())
            ]
            out += [
                "# HELP dsrecipes_request_latency_seconds Request latency (to the last byte).",
                "# TYPE dsrecipes_request_latency_seconds histogram",
            ]
            for e, h in sorted(self.latency.items()):
                out += h.lines("dsrecipes_request_latency_seconds", f'endpoint="{e}"')
            out += [
                "# HELP dsrecipes_time_to_first_token_seconds Streamed completions: time to the first chunk.",
                "# TYPE dsrecipes_time_to_first_token_seconds histogram",
            ]
            out += self.ttft.lines("dsrecipes_time_to_first_token_seconds", "")
            out += [
                "# HELP dsrecipes_batch_size Rows in one model forward, by kind (prefill, decode, embed).",
                "# TYPE dsrecipes_batch_size histogram",
            ]
            for k, h in sorted(self.batch.items()):
                out += h.lines("dsrecipes_batch_size", f'kind="{k}"')
            out += ["# HELP dsrecipes_tokens_total Tokens processed, by kind.", "# TYPE dsrecipes_tokens_total counter"]
            out += [f'dsrecipes_tokens_total{{kind="{k}"}} {n}' for k, n in sorted(self.tokens.items())]
            out += [
                "# HELP dsrecipes_queue_depth Sequences and embedding inputs waiting for a batch slot.",
                "# TYPE dsrecipes_queue_depth gauge",
                f"dsrecipes_queue_depth {self.queue_depth()}",
                "# HELP dsrecipes_running_sequences Sequences in the running generation batch.",
                "# TYPE dsrecipes_running_sequences gauge",
                f"dsrecipes_running_sequences {self.running()}",
            ]
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# ----------------------------------------------------------------------------- the batcher
class Batcher:
    """One model thread; asyncio handlers hand work over through a condition variable and get results back
    with loop.call_soon_threadsafe. Generation: Engine steps (sequences join and leave between forwards).
    Embeddings: inputs of concurrent requests grouped up to max_batch_size or max_wait_ms."""

    def __init__(
        self,
        engine: Engine | None,
        encoder=None,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        metrics: Metrics | None = None,
        on_stop=None,
    ):
        self.engine, self.encoder, self.max_batch = engine, encoder, max_batch_size
        self.max_wait, self.max_queue = max_wait_ms / 1000.0, max_queue
        self.metrics = metrics or Metrics()
        self.metrics.queue_depth = self.queue_depth
        self.metrics.running = lambda: len(self.engine.active) if self.engine else 0
        self.cond = threading.Condition()
        self.inbox: list[Sequence] = []
        self.emb_inbox: list[tuple] = []  # (inputs, loop, future, t_arrival)
        self.first_arrival = None
        self.stopping, self.error = False, None
        self.on_stop = on_stop
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def queue_depth(self) -> int:
        waiting = len(self.engine.waiting) if self.engine else 0
        return len(self.inbox) + waiting + sum(len(x[0]) for x in self.emb_inbox)

    def _admit_check(self, n: int) -> None:
        if self.error:
            raise APIError(503, f"The model thread failed: {self.error}", None, "model_failed")
        if self.stopping:
            raise APIError(503, "The server is shutting down.", None, "shutting_down")
        if self.queue_depth() + n > self.max_queue:
            raise APIError(
                429, f"Too many queued requests (max_queue {self.max_queue}); retry later.", None, "queue_full"
            )

    # ------------------------------------------------------------------ asyncio side
    async def generate(self, prompts: list[list[int]], params: GenParams, stream: bool = True):
        """Async iterator of (index, delta_text, finish_reason|None, Sequence) for each prompt, interleaved;
        stream=False: one item per prompt, when it finishes (no per-token hand-over between threads)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(seq, delta):  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (seq.index, delta, seq.finish_reason, seq))

        seqs = [Sequence(p, params, emit, index=i, incremental=stream) for i, p in enumerate(prompts)]
        with self.cond:
            self._admit_check(len(seqs))
            self.inbox += seqs
            self.first_arrival = self.first_arrival or time.perf_counter()
            self.cond.notify()
        left = len(seqs)
        try:
            while left:
                item = await queue.get()
                if item is None:
                    raise RuntimeError(f"model thread failed: {self.error}")
                left -= bool(item[2])
                yield item
        finally:
            for s in seqs:  # client went away or an error: stop spending forwards on it
                if not s.finish_reason:
                    s.cancelled = True
            with self.cond:
                self.cond.notify()

    async def embed(self, inputs: list):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self.cond:
            self._admit_check(len(inputs))
            self.emb_inbox.append((inputs, loop, fut, time.perf_counter()))
            self.cond.notify()
        return await fut

    def close(self, timeout: float = 30.0) -> None:
        """Finish everything already accepted, then stop the model thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    # ------------------------------------------------------------------ model thread
    def _run(self) -> None:
        try:
            while self._one_round():
                pass
        except BaseException as exc:  # a bug here: fail what is waiting instead of hanging it, and refuse new work
            self.error = f"{type(exc).__name__}: {exc}"
            self._fail_generation(list(self.inbox))
            raise
        finally:
            if self.on_stop:
                self.on_stop()

    def _fail_generation(self, extra=()) -> None:
        eng = self.engine
        seqs = list(extra) + (eng.active + list(eng.waiting) if eng else [])
        if eng:
            eng.active, eng.waiting = [], type(eng.waiting)()
            eng.kv.keep([])
        for s in seqs:
            s.finish_reason = "error"
            s.emit(s, "")

    def _one_round(self) -> bool:
        with self.cond:
            while not (self.inbox or self.emb_inbox or (self.engine and self.engine.busy()) or self.stopping):
                self.cond.wait()
            idle = not (self.engine and self.engine.active)
            if idle and self.first_arrival and not self.stopping:  # dynamic batching: gather for max_wait_ms
                deadline = self.first_arrival + self.max_wait
                while len(self.inbox) < self.max_batch and time.perf_counter() < deadline and not self.stopping:
                    self.cond.wait(deadline - time.perf_counter())
            new, self.inbox, self.first_arrival = self.inbox, [], None
            emb = self._take_embeddings()
            if self.stopping and not (new or emb or (self.engine and self.engine.busy())):
                return False
        for s in new:
            self.engine.submit(s)
        if emb:
            self._run_embeddings(emb)
        if self.engine and self.engine.busy():
            try:
                info = self.engine.step()
            except Exception:  # noqa: BLE001 - e.g. out of memory: fail this batch, keep serving
                traceback.print_exc()
                self._fail_generation()
                return True
            if info["batch"]:
                self.metrics.observe("batch", info["batch"], info["kind"])
        return True

    def _take_embeddings(self) -> list:
        if not self.emb_inbox:
            return []
        wait_until = self.emb_inbox[0][3] + self.max_wait
        while (
            sum(len(x[0]) for x in self.emb_inbox) < self.max_batch
            and time.perf_counter() < wait_until
            and not self.stopping
            and not (self.engine and self.engine.active)
        ):
            self.cond.wait(wait_until - time.perf_counter())
        take, n = [], 0
        while self.emb_inbox and (not take or n + len(self.emb_inbox[0][0]) <= self.max_batch):
            item = self.emb_inbox.pop(0)
            take.append(item)
            n += len(item[0])
        return take

    def _run_embeddings(self, items: list) -> None:
        model, tok = self.encoder
        flat = [x for inputs, *_ in items for x in inputs]
        try:
            vectors, _ = embed(model, tok, flat)
            self.metrics.observe("batch", len(flat), "embed")
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the thread
            for _, loop, fut, _ in items:
                loop.call_soon_threadsafe(_set, fut, None, exc)
            return
        i = 0
        for inputs, loop, fut, _ in items:
            loop.call_soon_threadsafe(_set, fut, vectors[i : i + len(inputs)].tolist(), None)
            i += len(inputs)


def _set(fut, value, exc):
    if not fut.done():
        fut.set_exception(exc) if exc else fut.set_result(value)
