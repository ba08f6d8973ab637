"""The Batcher: one model thread fed by concurrent asyncio requests (dynamic + iteration-level batching).

    batcher = Batcher(engine, encoder=(model, tok), max_wait_ms=10, max_queue=256, metrics=Metrics())
    batcher.start()
    async for index, delta, finish, seq in batcher.generate([[1, 2, 3]], GenParams(max_tokens=8)): ...
    vectors = await batcher.embed([[101, 2023, 102]])

Generation runs dsrecipes.serve.engine.Engine steps (sequences join and leave between forwards); embedding inputs
of concurrent requests are grouped up to max_batch_size or max_wait_ms. Used by dsrecipes.serve.app.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

from dsrecipes.serve.api import APIError
from dsrecipes.serve.engine import Engine, Sequence
from dsrecipes.serve.loading import embed
from dsrecipes.serve.metrics import Metrics


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
    async def generate(self, prompts: list[list[int]], params, stream: bool = True):
        """Async iterator of (index, delta_text, finish_reason|None, Sequence) for each prompt, interleaved;
        stream=False: one item per prompt, when it finishes (no per-token hand-over between threads).
        params: one GenParams for every prompt, or a list with one per prompt."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(seq, delta):  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (seq.index, delta, seq.finish_reason, seq))

        each = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [Sequence(p, q, emit, index=i, incremental=stream) for i, (p, q) in enumerate(zip(prompts, each))]
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
