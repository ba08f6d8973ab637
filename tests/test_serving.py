"""The serving recipe over real HTTP: a real recipes/serve.py process on a free loopback port.

Run: .venv/bin/python -m pytest tests/test_serving.py -q
Covers completions (plain, streamed, stop, seed), embeddings, /v1/models, /health, /metrics, dynamic batching
(batch sizes > 1 in /metrics, batched greedy == unbatched greedy, short requests finish while a long one runs),
every bad-input class -> 4xx with an OpenAI error body (server still healthy), the API key, SIGTERM draining,
and the one-line config errors.
"""

from __future__ import annotations

import base64
import json
import math
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from conftest import ROOT, child_env
from serving_helpers import Server, build_bert, build_gpt2, sse_events

KEY = "test-key-123"
PROMPTS = ["ba", "kolem dasi", "z", "fupatu ramo kise vo", "mi", "teko lanu bafe ripo gasu delo"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_models")
    return SimpleNamespace(gpt2=build_gpt2(str(root / "gpt2")), bert=build_bert(str(root / "bert")), root=root)


@pytest.fixture(scope="module")
def server(models):
    srv = Server(
        [
            "--config",
            "configs/recipes/serve_cpu.yaml",
            "--model_name_or_path",
            models.gpt2,
            "--served_model_name",
            "tiny-gpt2",
            "--embedding_model_name_or_path",
            models.bert,
            "--embedding_model_name",
            "tiny-bert",
            "--max_batch_size",
            "8",
            "--max_wait_ms",
            "50",
            "--max_tokens_limit",
            "600",
            "--max_prompt_tokens",
            "64",
            "--max_body_bytes",
            "20000",
        ],
        str(models.root / "server.log"),
        api_key=KEY,
    )
    yield srv
    assert srv.stop() == 0, srv.tail()


# ----------------------------------------------------------------------------- happy paths
def test_completion_plain_and_seeded(server):
    out = server.complete("kolem", max_tokens=12, model="tiny-gpt2")
    assert out["object"] == "text_completion" and out["model"] == "tiny-gpt2"
    choice = out["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and choice["index"] == 0
    assert out["usage"]["prompt_tokens"] == 5 and 1 <= out["usage"]["completion_tokens"] <= 12
    # greedy is deterministic; sampling with a seed is reproducible, and differs across seeds
    texts = {server.complete("kolem", max_tokens=12)["choices"][0]["text"] for _ in range(2)}
    assert len(texts) == 1
    sampled = [
        server.complete("kolem", max_tokens=24, temperature=1.0, top_p=0.9, seed=s)["choices"][0]["text"]
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_completion_list_prompt_and_stop(server):
    out = server.complete(["ba", "mi"], max_tokens=10)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    full = server.complete("ba", max_tokens=30)["choices"][0]["text"]
    assert out["choices"][0]["text"] == full[: len(out["choices"][0]["text"])]
    stop = full[10:12]
    cut = server.complete("ba", max_tokens=30, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.find(stop)], (full, stop, cut)


def test_completion_stream(server):
    plain = server.complete("fupatu", max_tokens=20)["choices"][0]["text"]
    body = {
        "prompt": "fupatu",
        "max_tokens": 20,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain
    assert chunks[-1]["usage"]["completion_tokens"] == 20 and chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert len([c for c in chunks if c["choices"]]) > 2  # really incremental


def test_embeddings(server, models):
    r = server.post("/v1/embeddings", {"input": ["hello world", "kolem dasi"], "model": "tiny-bert"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and r.json()["usage"]["prompt_tokens"] > 4
    for d in data:
        assert math.isclose(math.sqrt(sum(x * x for x in d["embedding"])), 1.0, rel_tol=1e-4)
    b64 = server.post("/v1/embeddings", {"input": "hello world", "encoding_format": "base64"}).json()["data"][0]
    raw = base64.b64decode(b64["embedding"])
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert max(abs(a - b) for a, b in zip(floats, data[0]["embedding"])) < 1e-5
    # the same vector as the model run in-process
    from transformers import AutoModel, AutoTokenizer

    from dsrecipes.serve.loading import embed

    ref, _ = embed(
        AutoModel.from_pretrained(models.bert).eval(), AutoTokenizer.from_pretrained(models.bert), ["hello world"]
    )
    assert max(abs(a - b) for a, b in zip(ref[0].tolist(), data[0]["embedding"])) < 1e-4


def test_models_and_health(server):
    ids = [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    assert ids == ["tiny-gpt2", "tiny-bert"]
    h = server.client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ids


# ----------------------------------------------------------------------------- batching
def _batches_over_one(server) -> int:
    from dsrecipes.serve.metrics import parse_metrics

    m = parse_metrics(server.client.get("/metrics").text)
    return sum(
        m[f'dsrecipes_batch_size_count{{kind="{k}"}}'] - m[f'dsrecipes_batch_size_bucket{{kind="{k}",le="1"}}']
        for k in ("prefill", "decode")
        if f'dsrecipes_batch_size_count{{kind="{k}"}}' in m
    )


def test_concurrent_requests_are_batched_and_match_unbatched(server):
    alone = [server.complete(p, max_tokens=8 + 3 * i)["choices"][0]["text"] for i, p in enumerate(PROMPTS)]
    before = _batches_over_one(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(
            pool.map(
                lambda ip: server.complete(ip[1], max_tokens=8 + 3 * ip[0])["choices"][0]["text"], enumerate(PROMPTS)
            )
        )
    assert together == alone  # left padding, position ids and cache merging change nothing
    assert _batches_over_one(server) > before  # /metrics saw forwards with more than one row


def _metric(server, name: str) -> float:
    from dsrecipes.serve.metrics import parse_metrics

    return parse_metrics(server.client.get("/metrics").text)[name]


def test_short_requests_do_not_wait_for_a_long_one(server):
    """Continuous batching: short requests sent while a long one decodes join its batch and finish while it still
    runs. No sleeps and no wall-clock slack: the shorts go out once the long one's stream has delivered tokens and
    /metrics shows it running; the checks are on completion events and token counts."""
    chunks, long_done, usage = [], threading.Event(), {}
    decoding = threading.Event()

    def stream_long():
        body = {"prompt": "ba", "max_tokens": 600, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        try:
            with server.client.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        chunks.append(chunk["choices"][0])
                        if len(chunks) >= 4:
                            decoding.set()
                    if chunk.get("usage"):
                        usage.update(chunk["usage"])
        finally:
            long_done.set()
            decoding.set()

    long = threading.Thread(target=stream_long)
    long.start()
    assert decoding.wait(120) and not long_done.is_set(), "the long completion did not start streaming"
    assert _metric(server, "dsrecipes_running_sequences") >= 1  # the server has it in its running batch
    batched_before = _batches_over_one(server)

    def short(prompt):
        out = server.complete(prompt, max_tokens=4)
        return out, len(chunks), long_done.is_set()  # the long one's progress when this short one came back

    with ThreadPoolExecutor(3) as pool:
        shorts = list(pool.map(short, PROMPTS[:3]))
    still_running = _metric(server, "dsrecipes_running_sequences")
    long.join(300)
    assert not long.is_alive() and usage, "the long completion did not finish"
    for out, seen, was_done in shorts:
        assert out["usage"]["completion_tokens"] <= 4 and out["choices"][0]["finish_reason"] in ("length", "stop")
        assert not was_done and seen < len(chunks), (seen, len(chunks))  # came back while the long one decoded
    assert still_running >= 1  # server side: the long sequence was still in the batch after every short returned
    assert usage["completion_tokens"] == 600 and chunks[-1]["finish_reason"] == "length", usage
    assert len(chunks) - max(seen for _, seen, _ in shorts) > 4, len(chunks)  # it decoded on after the shorts
    assert _batches_over_one(server) > batched_before  # the shorts shared forwards with the long one


# ----------------------------------------------------------------------------- bad input -> 4xx, server stays up
BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "a", ', 400),
    ("body is not an object", "/v1/completions", [1, 2], 400),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400),
    ("max_tokens as a string", "/v1/completions", {"prompt": "a", "max_tokens": "8"}, 400),
    ("max_tokens as a float", "/v1/completions", {"prompt": "a", "max_tokens": 8.5}, 400),
    ("prompt as a number", "/v1/completions", {"prompt": 5}, 400),
    ("temperature as text", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400),
    ("temperature out of range", "/v1/completions", {"prompt": "a", "temperature": 3}, 400),
    ("top_p out of range", "/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    ("max_tokens zero", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    ("max_tokens over the cap", "/v1/completions", {"prompt": "a", "max_tokens": 601}, 400),
    ("n > 1", "/v1/completions", {"prompt": "a", "n": 2}, 400),
    ("prompt over max_prompt_tokens", "/v1/completions", {"prompt": "x" * 65}, 400),
    ("more prompts than max_batch_size", "/v1/completions", {"prompt": ["a"] * 9}, 400),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 2, 99999]}, 400),
    ("negative token id", "/v1/completions", {"prompt": [1, -2]}, 400),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400),
    ("unknown model", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404),
    ("encoder asked for completions", "/v1/completions", {"prompt": "a", "model": "tiny-bert"}, 400),
    ("unknown embedding model", "/v1/embeddings", {"input": "a", "model": "nope"}, 404),
    ("bad encoding_format", "/v1/embeddings", {"input": "a", "encoding_format": "int4"}, 400),
    ("embedding input too long", "/v1/embeddings", {"input": "a " * 100}, 400),
    ("body over max_body_bytes", "/v1/completions", {"prompt": "a" * 30000}, 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(server, name, path, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert server.client.get("/health").json()["status"] == "ok"


def test_wrong_method_and_path(server):
    for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/nothing", 404)):
        r = server.client.request(method, path)
        assert r.status_code == status and "error" in r.json()
    assert server.client.get("/health").status_code == 200


def test_api_key_enforced(server):
    plain = httpx.Client(base_url=server.url, trust_env=False)
    body = {"prompt": "a", "max_tokens": 2}
    assert plain.post("/v1/completions", json=body).status_code == 401
    r = plain.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert plain.get("/v1/models").status_code == 401 and plain.get("/metrics").status_code == 401
    assert plain.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert plain.get("/health").status_code == 200  # liveness stays open
    plain.close()


# ----------------------------------------------------------------------------- SIGTERM drains in-flight requests
def test_sigterm_finishes_requests_in_flight(models):
    srv = Server(
        ["--model_name_or_path", models.gpt2, "--max_tokens_limit", "900", "--num_threads", "1"],
        str(models.root / "sigterm.log"),
    )
    body = {
        "prompt": "ba",
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines, signalled_at = [], None
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            lines.append(line)
            if signalled_at is None and len(sse_events(lines)) == 3:
                srv.proc.send_signal(signal.SIGTERM)
                signalled_at = len(sse_events(lines))
                time.sleep(0.5)
                with pytest.raises(httpx.TransportError):  # no new connections once shutting down
                    httpx.get(srv.url + "/health", timeout=2, trust_env=False)
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and len(events) > signalled_at + 2
    finish = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"][0]["finish_reason"]]
    assert finish in (["length"], ["stop"])  # generation ran to its own end (max_tokens or EOS), not cut off
    assert events[-2]["usage"]["completion_tokens"] > signalled_at + 2
    assert srv.proc.wait(60) == 0, srv.tail()
    assert "server stopped" in srv.tail()
    srv.stop()


# ----------------------------------------------------------------------------- configs that cannot work
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--dtype", "int8", "--engine", "deepspeed"], "DeepSpeed #8577"),
        (["--quantization", "torch_int8_dynamic", "--engine", "deepspeed"], "DeepSpeed #8577"),
        (["--dtype", "fp16"], "fp16 needs a GPU"),
        (["--quantization", "bnb_int8"], "needs a CUDA GPU"),
        (["--kernel_inject", "true", "--engine", "deepspeed"], "kernel injection"),
        (["--tp_size", "2", "--engine", "deepspeed"], "process(es) were launched"),
    ],
)
def test_config_errors_are_one_line(flags, needle):
    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.config.errors import ConfigError
    from dsrecipes.serve.loading import check_serve_args

    args, _ = parse_args(RECIPES["serve"], ["--model_name_or_path", "x", *flags])
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_serve_args(args, "<cli>", world_size=1, cuda=False)


def test_recipe_prints_one_line_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "recipes/serve.py", "--model_name_or_path", "x", "--dtype", "int8", "--engine", "deepspeed"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1 and "#8577" in err[0] and "Traceback" not in proc.stderr


def test_a_server_that_cannot_start_fails_fast_with_its_log(tmp_path):
    from dsrecipes.launching import LaunchError

    with pytest.raises(LaunchError, match="exited 2") as exc:
        Server(["--model_name_or_path", "x", "--dtype", "int8", "--engine", "deepspeed"], str(tmp_path / "bad.log"))
    assert "error: " in str(exc.value) and "#8577" in str(exc.value)  # the recipe's one line, in the failure


# ----------------------------------------------------------------------------- shipped configs, launched
@pytest.mark.slow
def test_serve_int8_cpu_config_serves_the_dynamic_int8_model(models):
    """configs/recipes/serve_int8_cpu.yaml as shipped (only the model path given): the server answers, says it
    quantized, and its greedy text is the in-process torch_int8_dynamic model's, whose Linear layers are int8."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsrecipes.config.args import RECIPES, parse_args
    from dsrecipes.serve.engine import Engine, GenParams
    from dsrecipes.serve.loading import load_lm

    srv = Server(
        ["--config", "configs/recipes/serve_int8_cpu.yaml", "--model_name_or_path", models.gpt2, "--num_threads", "1"],
        str(models.root / "int8.log"),
    )
    try:
        outs = [srv.complete(p, max_tokens=12) for p in PROMPTS[:3]]
        served = [m["id"] for m in srv.client.get("/v1/models").json()["data"]]
    finally:
        code = srv.stop()
    assert code == 0, srv.tail()
    assert "quantization torch_int8_dynamic" in srv.tail() and len(served) == 1
    args, _ = parse_args(
        RECIPES["serve"], ["--config", "configs/recipes/serve_int8_cpu.yaml", "--model_name_or_path", models.gpt2]
    )
    model, tok = load_lm(args)
    int8 = [n for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(int8) == 8, int8  # 2 blocks x (attention in + out, MLP in + out); lm_head stays fp32
    ids = torch.tensor([tok.encode(PROMPTS[3])])
    fp32 = AutoModelForCausalLM.from_pretrained(models.gpt2).eval()
    with torch.no_grad():
        gap = (model(ids).logits - fp32(ids).logits).abs().max().item()
    assert 0 < gap < 0.5, gap  # int8 rounding: near fp32, not equal to it
    # one prompt per batch, as the server ran them: dynamic int8 scales activations per tensor (batch mates matter)
    seqs = [Engine(model, tok, 8).generate([tok.encode(p)], GenParams(12, temperature=0))[0] for p in PROMPTS[:3]]
    for out, seq in zip(outs, seqs):
        assert out["choices"][0]["text"] == seq.text and out["usage"]["completion_tokens"] >= 1
