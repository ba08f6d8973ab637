"""Load generator for a running dsrecipes server (any OpenAI-compatible one): latency and throughput under load.

    dsrecipes loadgen --url http://127.0.0.1:8000 --concurrency 1 4 16 --duration 10 --max-tokens 32 \
        --prompt-len uniform:16:64 --stream --out load.json --plot load.png
    dsrecipes loadgen --rate 20 --requests 200 ...          (open loop: Poisson arrivals at 20 requests/s)

Reports per level: p50/p95/p99 latency, time to first token (with --stream), requests/s, tokens/s and errors;
writes JSON (--out) and a PNG (--plot). Loopback servers only; every run is bounded by --duration or --requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from urllib.parse import urlparse

from dsrecipes.config.errors import ConfigError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ----------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL (loopback only).")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat", "embeddings"])
    p.add_argument("--model", default=None, help="`model` field of each request (default: the server's default).")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--concurrency", type=int, nargs="+", default=None, help="Closed loop: clients in flight, one level each."
    )
    g.add_argument(
        "--rate", type=float, nargs="+", default=None, help="Open loop: Poisson arrivals per second, one level each."
    )
    p.add_argument("--duration", type=float, default=None, help="Seconds per level (default 10 unless --requests).")
    p.add_argument(
        "--requests", type=int, default=None, help="Requests per level (instead of, or capping, --duration)."
    )
    p.add_argument(
        "--prompt-len",
        default="32",
        help="Prompt length in characters (= tokens for the byte tokenizer): N | uniform:LO:HI | normal:MEAN:STD.",
    )
    p.add_argument("--max-tokens", default="32", help="max_tokens per request, same forms as --prompt-len.")
    p.add_argument("--inputs-per-request", type=int, default=1, help="Embeddings: texts per request.")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="Stream completions and measure time to first token.")
    p.add_argument("--timeout", type=float, default=120.0, help="Per-request timeout in seconds.")
    p.add_argument("--max-in-flight", type=int, default=256, help="Open loop: cap on requests in flight.")
    p.add_argument(
        "--api-key-env", default="DSRECIPES_API_KEY", help="Env var holding the API key (if the server wants one)."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Write the results JSON here.")
    p.add_argument("--plot", default=None, help="Write a latency/throughput PNG here.")


def run(ns) -> int:
    cfg = config_from_args(ns)
    results = asyncio.run(run_levels(cfg))
    print(format_table(results))
    doc = {"config": {k: v for k, v in cfg.items() if k != "api_key"}, "levels": results}
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as fh:
            json.dump(doc, fh, indent=2)
    if ns.plot:
        plot(results, ns.plot)
    return 0 if all(r["ok"] > 0 for r in results) else 1


def config_from_args(ns) -> dict:
    host = urlparse(ns.url).hostname
    if host not in LOOPBACK:
        raise ConfigError(
            "<cli>", "--url", f"{host!r} is not a loopback address", "drive a server on 127.0.0.1 / localhost"
        )
    if ns.duration is None and ns.requests is None:
        ns.duration = 10.0
    if (ns.duration is not None and ns.duration <= 0) or (ns.requests is not None and ns.requests <= 0):
        raise ConfigError("<cli>", "--duration/--requests", "must be positive", "e.g. --duration 10 or --requests 100")
    levels = [("concurrency", c) for c in (ns.concurrency or [])] + [("rate", r) for r in (ns.rate or [])]
    levels = levels or [("concurrency", 1)]
    if any(v <= 0 for _, v in levels) or any(v > 1024 for k, v in levels if k == "concurrency"):
        raise ConfigError(
            "<cli>", "--concurrency/--rate", "levels must be > 0 (concurrency <= 1024)", "e.g. --concurrency 1 4 16"
        )
    return {
        "url": ns.url.rstrip("/"),
        "endpoint": ns.endpoint,
        "model": ns.model,
        "levels": levels,
        "duration": ns.duration,
        "requests": ns.requests,
        "prompt_len": parse_dist(ns.prompt_len, "--prompt-len"),
        "max_tokens": parse_dist(ns.max_tokens, "--max-tokens"),
        "inputs_per_request": ns.inputs_per_request,
        "temperature": ns.temperature,
        "stream": ns.stream,
        "timeout": ns.timeout,
        "max_in_flight": ns.max_in_flight,
        "api_key": os.environ.get(ns.api_key_env),
        "seed": ns.seed,
    }


def make_config(url: str, **kw) -> dict:
    """The same config dict as the CLI builds, for library use (benchmarks): make_config(url, stream=True, ...)."""
    cfg = {
        "url": url.rstrip("/"),
        "endpoint": "completions",
        "model": None,
        "levels": [("concurrency", 1)],
        "duration": 10.0,
        "requests": None,
        "prompt_len": ("fixed", 32),
        "max_tokens": ("fixed", 32),
        "inputs_per_request": 1,
        "temperature": 0.0,
        "stream": False,
        "timeout": 120.0,
        "max_in_flight": 256,
        "api_key": None,
        "seed": 0,
    }
    unknown = set(kw) - set(cfg)
    if unknown:
        raise TypeError(f"unknown loadgen settings {sorted(unknown)}")
    cfg.update(
        {
            k: parse_dist(v, k) if k in ("prompt_len", "max_tokens") and isinstance(v, (str, int)) else v
            for k, v in kw.items()
        }
    )
    return cfg


def parse_dist(spec: str, flag: str) -> tuple:
    """'32' | 'uniform:16:64' | 'normal:32:8' -> ('fixed', 32) / ('uniform', 16, 64) / ('normal', 32, 8)."""
    parts = str(spec).split(":")
    try:
        if len(parts) == 1:
            vals = ("fixed", int(parts[0]))
        elif parts[0] in ("uniform", "normal") and len(parts) == 3:
            vals = (parts[0], int(parts[1]), int(parts[2]))
        else:
            raise ValueError
    except ValueError:
        raise ConfigError("<cli>", flag, f"cannot parse {spec!r}", "use N, uniform:LO:HI or normal:MEAN:STD") from None
    if min(vals[1:]) < (0 if vals[0] == "normal" else 1):
        raise ConfigError("<cli>", flag, f"{spec!r} has a value below 1", "lengths are positive")
    return vals


def draw(dist: tuple, rng: random.Random) -> int:
    if dist[0] == "fixed":
        return dist[1]
    if dist[0] == "uniform":
        return rng.randint(dist[1], dist[2])
    return max(1, round(rng.gauss(dist[1], dist[2])))


def make_text(n_chars: int, rng: random.Random) -> str:
    from dsrecipes.train.data import generated_corpus

    words = make_text.words = getattr(make_text, "words", None) or " ".join(generated_corpus(20, 1234, 7)).split()
    out = ""
    while len(out) < n_chars:
        out += rng.choice(words) + " "
    return out[:n_chars]


# ----------------------------------------------------------------------------- one request
async def one_request(client, cfg: dict, rng: random.Random) -> dict:
    """-> {ok, latency, ttft, completion_tokens, error}."""
    headers = {"Authorization": f"Bearer {cfg['api_key']}"} if cfg.get("api_key") else {}
    if cfg["endpoint"] == "embeddings":
        inputs = [make_text(draw(cfg["prompt_len"], rng), rng) for _ in range(cfg["inputs_per_request"])]
        body, path = {"input": inputs if len(inputs) > 1 else inputs[0]}, "/v1/embeddings"
    else:
        body = {
            "prompt": make_text(draw(cfg["prompt_len"], rng), rng),
            "max_tokens": draw(cfg["max_tokens"], rng),
            "temperature": cfg["temperature"],
            "stream": cfg["stream"],
        }
        if cfg["stream"]:
            body["stream_options"] = {"include_usage": True}
        path = "/v1/completions"
        if cfg["endpoint"] == "chat":
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
            path = "/v1/chat/completions"
    if cfg.get("model"):
        body["model"] = cfg["model"]
    t0 = time.perf_counter()
    rec = {"ok": False, "latency": None, "ttft": None, "completion_tokens": 0, "error": None}
    try:
        if cfg["stream"] and path != "/v1/embeddings":
            async with client.stream("POST", cfg["url"] + path, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec["error"] = f"http_{resp.status_code}"
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rec["error"] = "stream_error"
                        return rec
                    choices = chunk.get("choices", [])
                    if rec["ttft"] is None and any(c.get("text") or c.get("delta", {}).get("content") for c in choices):
                        rec["ttft"] = time.perf_counter() - t0
                    if chunk.get("usage"):
                        rec["completion_tokens"] = chunk["usage"]["completion_tokens"]
        else:
            resp = await client.post(cfg["url"] + path, json=body, headers=headers)
            if resp.status_code != 200:
                rec["error"] = f"http_{resp.status_code}"
                return rec
            usage = resp.json().get("usage", {})
            rec["completion_tokens"] = usage.get(
                "completion_tokens", usage.get("total_tokens", 0) if path.endswith("embeddings") else 0
            )
        rec["ok"], rec["latency"] = True, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
        rec["error"] = type(exc).__name__
    return rec


# ----------------------------------------------------------------------------- levels
async def run_level(cfg: dict, kind: str, value: float, seed: int = 0, records: list | None = None) -> dict:
    """One level; pass `records` (a list) to also get the raw per-request records appended to it."""
    import httpx

    rng = random.Random(seed)
    records = [] if records is None else records
    limit = cfg["requests"] or math.inf
    deadline = time.perf_counter() + cfg["duration"] if cfg["duration"] else math.inf
    n_conn = int(value) if kind == "concurrency" else cfg["max_in_flight"]
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    started = 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=cfg["timeout"], limits=limits, trust_env=False) as client:
        if kind == "concurrency":

            async def worker():
                nonlocal started
                while started < limit and time.perf_counter() < deadline:
                    started += 1
                    records.append(await one_request(client, cfg, rng))

            await asyncio.gather(*(worker() for _ in range(int(value))))
        else:  # open loop: Poisson arrivals, bounded in flight
            sem, tasks = asyncio.Semaphore(cfg["max_in_flight"]), []

            async def fire():
                async with sem:
                    records.append(await one_request(client, cfg, rng))

            while started < limit and time.perf_counter() < deadline:
                started += 1
                tasks.append(asyncio.create_task(fire()))
                await asyncio.sleep(rng.expovariate(value))
            await asyncio.gather(*tasks)
    return summarize(records, time.perf_counter() - t0, kind, value)


async def run_levels(cfg: dict) -> list[dict]:
    return [await run_level(cfg, kind, value, cfg["seed"] + i) for i, (kind, value) in enumerate(cfg["levels"])]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[dict], seconds: float, kind: str, value: float) -> dict:
    ok = [r for r in records if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    errors: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    toks = sum(r["completion_tokens"] for r in ok)
    return {
        kind: value,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "duration_s": round(seconds, 3),
        "req_per_s": len(ok) / seconds,
        "tokens_per_s": toks / seconds,
        "completion_tokens": toks,
        **{f"latency_p{q}_s": percentile(lat, q) for q in (50, 95, 99)},
        "latency_mean_s": sum(lat) / len(lat) if lat else None,
        **{f"ttft_p{q}_s": percentile(ttft, q) for q in (50, 95, 99)},
    }


def format_table(results: list[dict]) -> str:
    cols = ["level", "requests", "errors", "req/s", "tok/s", "p50 s", "p95 s", "p99 s", "ttft p50 s"]
    rows = [" | ".join(cols)]
    for r in results:
        level = f"c={r['concurrency']}" if "concurrency" in r else f"rate={r['rate']}"
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(
            " | ".join(
                [
                    level,
                    str(r["requests"]),
                    str(r["errors"]),
                    f"{r['req_per_s']:.2f}",
                    f"{r['tokens_per_s']:.1f}",
                    f(r["latency_p50_s"]),
                    f(r["latency_p95_s"]),
                    f(r["latency_p99_s"]),
                    f(r["ttft_p50_s"]),
                ]
            )
        )
    return "\n".join(rows)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "concurrency" if "concurrency" in results[0] else "rate"
    xs = [r[key] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["tokens_per_s"] for r in results], "o-", label="tokens/s")
    a.plot(xs, [r["req_per_s"] for r in results], "s-", label="requests/s")
    a.set(xlabel=key, title="throughput", xscale="log")
    a.legend()
    for q in (50, 95, 99):
        b.plot(xs, [r[f"latency_p{q}_s"] or float("nan") for r in results], "o-", label=f"p{q}")
    b.set(xlabel=key, ylabel="seconds", title="latency", xscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
