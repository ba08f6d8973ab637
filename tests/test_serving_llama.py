"""Serving a Llama (configs/models/tiny_llama.json: GQA 4 heads / 2 KV heads, RMSNorm, RoPE, tied head) through a
real recipes/serve.py process: greedy /v1/completions equal transformers' generate (also batched with left
padding, where the RoPE positions come from the attention mask), prompt logprobs (echo) equal plain transformers
within 1e-4, /v1/chat/completions renders the model's own chat template; torch_int8_dynamic quantizes every
decoder projection and serves it; DeepSpeed init_inference (TP=1 in-process, TP=2 over 2 processes with the 2 KV
heads split) gives plain transformers' greedy tokens.

Run: .venv/bin/python -m pytest tests/test_serving_llama.py -q        (the int8 server and TP=2 tests are slow)
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from serving_helpers import LLAMA_CHAT_TEMPLATE, Server, build_llama_family

PROMPTS = ["kolem dasi", "z", "fupatu ramo kise vo", "ba mi teko"]
MESSAGES = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "kolem dasi fupatu"}]
N = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama_family(str(tmp_path_factory.mktemp("llama_serve") / "llama"))


@pytest.fixture(scope="module")
def hf(llama):
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(llama).eval(), load_tokenizer(None, llama)


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("llama_serve_log") / "server.log"
    srv = Server(["--model_name_or_path", llama, "--served_model_name", "tiny-llama", "--max_wait_ms", "100"], str(log))
    yield srv
    assert srv.stop() == 0, srv.tail()


def generate(model, tok, prompt: str, n: int = N) -> str:
    """transformers' own greedy generate, one prompt at a time (no padding), the new tokens as text."""
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def serve_args(*argv):
    from dsrecipes.config.args import RECIPES, parse_args

    return parse_args(RECIPES["serve"], list(argv))[0]


def test_llama_greedy_completions_equal_transformers_generate(server, hf):
    model, tok = hf
    assert model.config.num_key_value_heads == 2 and model.config.model_type == "llama"
    want = [generate(model, tok, p) for p in PROMPTS]
    one = [server.complete(p, max_tokens=N, model="tiny-llama")["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: one left-padded batch of different lengths
        batched = list(pool.map(lambda p: server.complete(p, max_tokens=N)["choices"][0]["text"], PROMPTS))
    assert one == want and batched == want, (one, batched, want)
    assert len(set(want)) > 1 and all(want), want  # real, prompt-dependent text


def test_llama_echo_prompt_logprobs_equal_transformers(server, hf):
    model, tok = hf
    body = {"prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    out = server.post("/v1/completions", body).json()
    worst = 0.0
    for prompt, choice in zip(PROMPTS, out["choices"]):
        ids = tok.encode(prompt, add_special_tokens=False)
        lp = choice["logprobs"]
        assert choice["text"] == prompt and len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        worst = max([worst, *(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want))])
    print(f"llama echo logprobs: max |served - transformers| = {worst:.2e}")
    assert worst < 1e-4


def test_llama_chat_renders_the_models_own_template(server, hf):
    from dsrecipes.chat import DEFAULT_CHAT_TEMPLATE, chat_template, render_chat

    model, tok = hf
    assert chat_template(tok) == LLAMA_CHAT_TEMPLATE != DEFAULT_CHAT_TEMPLATE  # saved with the model directory
    prompt = render_chat(tok, MESSAGES)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nanswer briefly<|eot_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    chat = server.post("/v1/chat/completions", body).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False))
    assert chat["choices"][0]["message"]["content"] == generate(model, tok, prompt, 12)


def test_llama_init_inference_tp1_gives_transformers_greedy(llama, hf, monkeypatch):
    import deepspeed

    from dsrecipes.serve.engine import Engine, GenParams
    from dsrecipes.serve.loading import load_lm

    model, tok = hf
    engines, real = [], deepspeed.init_inference
    monkeypatch.setattr(deepspeed, "init_inference", lambda *a, **kw: engines.append(real(*a, **kw)) or engines[-1])
    ds, _ = load_lm(serve_args("--model_name_or_path", llama, "--engine", "deepspeed"))
    assert len(engines) == 1 and ds is engines[0].module  # the real init_inference ran; its module is served
    seqs = Engine(ds, tok, 8).generate([tok.encode(p) for p in PROMPTS], GenParams(N, temperature=0))
    assert [s.text for s in seqs] == [generate(model, tok, p) for p in PROMPTS]


@pytest.mark.slow
def test_llama_int8_dynamic_quantizes_every_projection_and_serves(llama, hf, tmp_path):
    from dsrecipes.serve.loading import load_lm

    model, tok = hf
    q, _ = load_lm(serve_args("--model_name_or_path", llama, "--quantization", "torch_int8_dynamic"))
    int8 = [n for n, m in q.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(int8) == 4 * 7, int8  # 4 decoder layers x (q, k, v, o, gate, up, down); the tied head stays fp32
    # an untrained model has many near-ties, where int8 rounding may flip the top-1: measure the distance (KL)
    # everywhere, and top-1 agreement where fp32 is decided (top-1 ahead of top-2 by > 0.5 nats)
    kls, decided = [], []
    for p in PROMPTS:
        ids = torch.tensor([tok.encode(p) + tok.encode(generate(model, tok, p))])
        with torch.no_grad():
            a, b = torch.log_softmax(model(ids).logits[0], -1), torch.log_softmax(q(ids).logits[0], -1)
        kls.append((a.exp() * (a - b)).sum(-1))
        top2 = a.topk(2, -1).values
        decided.append((a.argmax(-1) == b.argmax(-1))[top2[:, 0] - top2[:, 1] > 0.5])
    kl, decided = torch.cat(kls).mean().item(), torch.cat(decided)
    print(
        f"llama int8: KL(fp32 || int8) {kl:.4f} nats/token, top-1 agreement {decided.float().mean():.3f} on "
        f"{len(decided)} decided positions"
    )
    assert kl < 0.05 and len(decided) >= 10 and decided.float().mean() >= 0.9, (kl, decided)  # measured 0.012, 0.94
    srv = Server(
        ["--model_name_or_path", llama, "--quantization", "torch_int8_dynamic", "--num_threads", "1"],
        str(tmp_path / "int8.log"),
    )
    try:
        chat = srv.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0}).json()
        from dsrecipes.chat import render_chat

        plain = srv.complete(render_chat(tok, MESSAGES), max_tokens=10)
    finally:
        assert srv.stop() == 0, srv.tail()
    assert "quantization torch_int8_dynamic" in srv.tail()
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"] and plain["choices"][0]["text"]


@pytest.mark.slow
def test_llama_gqa_tensor_parallel_2_gives_transformers_greedy(llama, hf, tmp_path):
    """AutoTP over 2 processes: each rank holds 2 of the 4 query heads and 1 of the 2 KV heads (one GQA group)."""
    from conftest import free_port

    model, tok = hf
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2"]
    srv = Server(
        ["--config", "configs/recipes/serve_tp2_cpu.yaml", "--model_name_or_path", llama],
        str(tmp_path / "tp2.log"),
        launcher=[*torchrun, "--master_port", str(free_port())],
    )
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(lambda p: srv.complete(p, max_tokens=N)["choices"][0]["text"], PROMPTS))
        assert "tp 2" in srv.tail()
    finally:
        srv.stop(signal.SIGTERM)
    assert got == [generate(model, tok, p) for p in PROMPTS]
    log = srv.tail(20000)
    assert "server stopped" in log and "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log
