"""Helpers for the serving tests: tiny model directories built from configs (no downloads) and a real server
process on a free loopback port.

Used by tests/test_serving.py, tests/test_serve_models.py (run: .venv/bin/python -m pytest tests -k serv -q).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from conftest import ROOT, child_env


def build_gpt2(path: str, n_positions: int = 1024, seed: int = 0, **cfg) -> str:
    """A 2-layer GPT-2 with the byte tokenizer, saved like train_lm's final/."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dsrecipes.train.data import byte_tokenizer

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    values = dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=n_positions,
        vocab_size=len(tok),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        initializer_range=0.1,
    )
    config = GPT2Config(**{**values, **cfg})
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_llama(path: str, seed: int = 0) -> str:
    """A 2-layer Llama (the architecture DeepSpeed AutoTP shards) with the byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsrecipes.train.data import byte_tokenizer

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_bert(path: str, seed: int = 0, hidden: int = 64, layers: int = 2) -> str:
    """A small BERT encoder with a character WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    )
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Server:
    """`python recipes/serve.py ... --port 0` (or a launcher prefix such as torchrun); waits until it answers."""

    def __init__(
        self,
        args: list[str],
        log_path: str,
        launcher: list[str] | None = None,
        api_key: str | None = None,
        timeout: float = 180.0,
    ):
        env = child_env()
        env.pop("DSRECIPES_API_KEY", None)
        if api_key:
            env["DSRECIPES_API_KEY"] = api_key
        cmd = (launcher or [sys.executable]) + ["recipes/serve.py", "--port", "0", *args]
        self.log_path, self.api_key = log_path, api_key
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = self._wait_url(timeout)
        self.client = httpx.Client(
            base_url=self.url,
            timeout=120,
            trust_env=False,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not become healthy:\n{self.tail()}")

    def _wait_url(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in open(self.log_path):
                if line.startswith("serving ") and " on http://" in line:
                    return line.split(" on ")[1].split()[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"server did not start in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as fh:
            return fh.read()[-n:]

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return self.client.post(path, json=body, **kw)

    def complete(self, prompt, **params) -> dict:
        r = self.post("/v1/completions", {"prompt": prompt, "temperature": 0, **params})
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.client.close()
        self.log.close()
        return self.proc.returncode


def sse_events(lines) -> list:
    """`data: {...}` lines of a server-sent-event stream -> parsed chunks, with '[DONE]' kept as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
