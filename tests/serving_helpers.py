"""Helpers for the serving tests: tiny model directories built from configs (no downloads) and a real server
process on a free loopback port (`Server`, from dsrecipes.launching).

Used by tests/test_serving.py, tests/test_serve_models.py (run: .venv/bin/python -m pytest tests -k serv -q).
"""

from __future__ import annotations

import json

from dsrecipes.launching import Server  # noqa: F401  (the one server launcher, shared with benchmarks/bench_serve.py)


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


# A Llama-3-style chat template in plain-text markers (the byte tokenizer has no special tokens for them): a model
# directory with its own template, which dsrecipes.chat must use instead of the default.
LLAMA_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ m['content'] ~ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_llama_family(path: str, model_config: str = "configs/models/tiny_llama.json", seed: int = 0) -> str:
    """A model from a configs/models JSON (tiny_llama: GQA, RMSNorm, RoPE, tied) with the byte tokenizer carrying
    LLAMA_CHAT_TEMPLATE, saved like train_lm's final/."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    config = load_model_config(model_config, tok)
    config.initializer_range = 0.1  # peaked next-token distributions: greedy has no near-ties to flip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.chat_template = LLAMA_CHAT_TEMPLATE
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


def sse_events(lines) -> list:
    """`data: {...}` lines of a server-sent-event stream -> parsed chunks, with '[DONE]' kept as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
