"""Serving for real clients: the official `openai` client against a real recipes/serve.py process (chat and
completions, streamed and not), prompt log-probabilities (echo) against plain transformers, logprobs, n, and the
parameters that are refused with a 400 naming them.

Run: .venv/bin/python -m pytest tests/test_serving_openai.py -q      (the int8 / init_inference one is slow)
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from serving_helpers import Server, build_gpt2

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")
MESSAGES = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "kolem dasi fupatu"}]
PROMPTS = ["kolem dasi", "z", "fupatu ramo kise vo"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_gpt2(str(tmp_path_factory.mktemp("openai") / "gpt2"))


@pytest.fixture(scope="module")
def server(gpt2, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai_log") / "server.log"
    srv = Server(["--model_name_or_path", gpt2, "--served_model_name", "tiny", "--max_wait_ms", "20"], str(log))
    yield srv
    assert srv.stop() == 0, srv.tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf(gpt2):
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(gpt2).eval(), load_tokenizer(None, gpt2)


def chat_prompt(tok) -> str:
    from dsrecipes.chat import render_chat

    return render_chat(tok, MESSAGES)


# ----------------------------------------------------------------------------- chat completions
def test_chat_matches_completions_of_the_rendered_template(client, hf):
    """Chat = the chat template rendered, then the same generation as completions (greedy: same text)."""
    _, tok = hf
    prompt = chat_prompt(tok)
    assert prompt.endswith("<|assistant|>\n") and "<|user|>\nkolem dasi fupatu" in prompt
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text and chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False)) == plain.usage.prompt_tokens
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=12, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content


def test_chat_stream_with_usage(client):
    want = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == want.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == want.choices[0].finish_reason
    assert len([c for c in with_choices if c.choices[0].delta.content]) > 2  # really incremental
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens


def test_chat_n_seed_stop_and_logprobs(client, hf):
    model, tok = hf
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, n=3, seed=7, logprobs=True, top_logprobs=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1  # n samples, not one copied
    same = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, n=3, seed=7)
    assert [c.message.content for c in same.choices] == texts  # seed: reproducible
    # the reported logprobs are the model's: score the sampled tokens with plain transformers
    ids = tok.encode(chat_prompt(tok), add_special_tokens=False)
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) >= 1 and all(len(e.top_logprobs) == 3 for e in content)
        # the byte tokenizer: a one-byte token's id is its byte; EOS is the only longer one
        seq = ids + [e.bytes[0] if len(e.bytes) == 1 else tok.eos_token_id for e in content]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        for j, e in enumerate(content):
            assert math.isclose(e.logprob, logp[len(ids) + j - 1, seq[len(ids) + j]].item(), abs_tol=1e-4)
            assert e.top_logprobs[0].logprob >= e.logprob - 1e-6
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[8:10]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------- completions: logprobs, echo
def test_echo_prompt_logprobs_equal_transformers(client, hf):
    """lm-eval's scoring call (echo, max_tokens 0, logprobs): every prompt token's logprob is plain
    transformers' log_softmax on the same directory, within 1e-4, also for prompts batched with others."""
    model, tok = hf
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert [c.text for c in out.choices] == PROMPTS and out.usage.completion_tokens == 0
    for prompt, choice in zip(PROMPTS, out.choices):
        ids = tok.encode(prompt, add_special_tokens=False)
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.text_offset == list(range(len(prompt)))  # one byte per ASCII character
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert max((abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)), default=0) < 1e-4, (prompt, want)
        for i in range(1, len(ids)):
            top = logp[i - 1].topk(2)
            assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_completion_logprobs_and_echo_with_generation(client, hf):
    model, tok = hf
    out = client.completions.create(model="tiny", prompt="kolem", max_tokens=6, logprobs=1, temperature=0, echo=True)
    choice = out.choices[0]
    gen = choice.text[len("kolem") :]
    assert choice.text.startswith("kolem") and len(choice.logprobs.tokens) >= 5 + 1
    plain = client.completions.create(model="tiny", prompt="kolem", max_tokens=6, temperature=0)
    assert gen == plain.choices[0].text
    lp = choice.logprobs
    for i in range(5, len(lp.tokens)):  # greedy: the generated token is the top-1
        assert math.isclose(lp.token_logprobs[i], max(lp.top_logprobs[i].values()), abs_tol=1e-6)
    assert lp.text_offset[:5] == [0, 1, 2, 3, 4] and lp.text_offset[5] == 5
    stream = client.completions.create(
        model="tiny", prompt="kolem", max_tokens=6, logprobs=1, temperature=0, stream=True
    )
    streamed = [lp for c in stream for lp in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed == pytest.approx(lp.token_logprobs[5:], abs=1e-6)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "a", "suffix": "end"}, "suffix"),
        ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 10}}, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "echo": True, "stream": True}, "echo"),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 17}, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 300}, "max_completion_tokens"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(server, path, body, param):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert server.client.get("/health").json()["status"] == "ok"


def test_openai_client_sees_errors_as_bad_request(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="a", best_of=3)
    assert "best_of" in str(exc.value)


# ----------------------------------------------------------------------------- the other engines serve chat
@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--quantization", "torch_int8_dynamic"], ["--engine", "deepspeed"]])
def test_chat_through_int8_and_init_inference(gpt2, tmp_path, flags):
    """int8 and DeepSpeed init_inference serve chat through the same batcher: chat == completions of the rendered
    template on that server, and the server says which engine it runs."""
    srv = Server(["--model_name_or_path", gpt2, "--num_threads", "1", *flags], str(tmp_path / "srv.log"))
    try:
        from dsrecipes.train.data import load_tokenizer

        prompt = chat_prompt(load_tokenizer(None, gpt2))
        chat = srv.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0}).json()
        plain = srv.complete(prompt, max_tokens=10)
        body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "stream": True}
        with srv.client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    finally:
        assert srv.stop() == 0, srv.tail()
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == plain["choices"][0]["text"]
    assert flags[1] in srv.tail()
