"""Server metrics: thread-safe counters and histograms rendered in the Prometheus text format (version 0.0.4).

metrics = Metrics(); metrics.request("/v1/completions", 200, 0.12); metrics.observe("batch", 4, "decode")
text = metrics.render()                      # GET /metrics
values = parse_metrics(text)                 # {'name{labels}': value}, for tests and benchmarks/bench_serve.py
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

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
