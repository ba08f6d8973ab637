"""What the memory planner knows about a model: a ModelSpec from a config.json, a model directory, a hub name or
explicit shape numbers (exact parameter tensors when the model builds on the meta device).

    spec = load_model_spec("configs/models/tiny_gpt2.json", vocab=257)
    spec = load_model_spec(layers=32, hidden=4096, heads=32, params=7e9)
Used by dsrecipes.memory.planner.
"""

from __future__ import annotations

import dataclasses
import math
import os

from dsrecipes import compat
from dsrecipes.config.errors import ConfigError


@dataclasses.dataclass
class ModelSpec:
    """What the planner needs to know about a model; numels (one per parameter tensor) make 8/4-bit and ZeRO-3
    persistence exact when the model could be built on the meta device."""

    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    ffn: int
    positions: int | None = None
    activation: str = "gelu_new"
    attn_dropout: bool = True
    resid_dropout: bool = True
    embd_dropout: bool = True
    attention: str = "sdpa"
    largest_layer: int = 0
    numels: tuple = ()
    exact: bool = False
    family: str = "gpt2"  # "gpt2" (LayerNorm, GELU MLP) or "llama" (RMSNorm, RoPE, GQA, SwiGLU: Llama, Qwen2, Mistral)
    kv_heads: int = 0  # key/value heads (GQA); 0: as many as heads
    head_dim: int = 0  # 0: hidden / heads
    tied: bool = True  # LM head shares the embedding matrix
    sharded: tuple = ()  # per numels entry: True if AutoTP shards it (block Linear weights, column-parallel biases)

    def __post_init__(self):
        self.kv_heads = self.kv_heads or self.heads
        self.head_dim = self.head_dim or self.hidden // self.heads


def _bad(key, problem, fix, where="<cli>"):
    return ConfigError(where, key, problem, fix)


def _positive(key, value, allow_zero=False):
    if value is None or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise _bad(key, f"{value!r} must be a {'non-negative' if allow_zero else 'positive'} number", f"give {key} > 0")
    return value


LLAMA_TYPES = ("llama", "qwen2", "mistral")  # measured family: the activation terms are exact for these
# AutoTP shards these Linear layers (column-parallel: q/k/v, gate/up, c_attn, c_fc; row-parallel: o/down, c_proj);
# column-parallel biases shard with their weight, row-parallel biases stay whole
TP_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc")
TP_ROW = ("o_proj", "down_proj", "c_proj")


def _gpt2_numels(layers, hidden, ffn, vocab, positions):
    h, f = hidden, ffn
    block = (h, h, 3 * h * h, 3 * h, h * h, h, h, h, h * f, f, f * h, h)
    shard = (False, False, True, True, True, False, False, False, True, True, True, False)
    numels = (vocab * h, (positions or 1024) * h) + block * layers + (h, h)
    return numels, (False, False) + shard * layers + (False,) * 2


def _llama_numels(layers, hidden, ffn, vocab, heads, kv_heads, tied):
    h, f, kvd = hidden, ffn, kv_heads * (hidden // heads)
    block = (h * h, kvd * h, kvd * h, h * h, f * h, f * h, h * f, h, h)  # q k v o gate up down, 2 RMSNorms
    shard = (True,) * 7 + (False, False)
    head = () if tied else (vocab * h,)
    return (vocab * h,) + block * layers + (h,) + head, (False,) + shard * layers + (False,) + (False,) * len(head)


def tp_sharded(name: str) -> bool:
    """Whether AutoTP shards the parameter `name` (a model.named_parameters() name)."""
    parts = name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
    return module in TP_COLUMN or (module in TP_ROW and kind == "weight")


def load_model_spec(
    source=None,
    *,
    params=None,
    layers=None,
    hidden=None,
    heads=None,
    vocab=None,
    ffn=None,
    arch="gpt2",
    kv_heads=None,
    tied=True,
):
    """A ModelSpec from a config.json file, a local model directory, a hub name, or explicit shape numbers
    (arch "gpt2" or "llama"; kv_heads for grouped-query attention, tied=False for an untied LM head)."""
    if source is None:
        for key, value in (("--layers", layers), ("--hidden", hidden), ("--heads", heads)):
            _positive(key, value)
        if arch not in ("gpt2", "llama"):
            raise _bad("--arch", f"unknown architecture {arch!r}", "use gpt2 or llama")
        vocab = int(_positive("--vocab", vocab if vocab is not None else 50257))
        llama = arch == "llama"
        default_ffn = 256 * math.ceil(8 * hidden / 3 / 256) if llama else 4 * hidden  # Llama: 2/3 of 4h, rounded
        ffn = int(_positive("--ffn", ffn if ffn is not None else default_ffn))
        if hidden % heads:
            raise _bad("--heads", f"hidden {hidden} is not divisible by {heads} heads", "give a divisor of --hidden")
        kv = int(_positive("--kv-heads", kv_heads)) if kv_heads is not None else int(heads)
        if heads % kv:
            raise _bad("--kv-heads", f"{heads} heads do not group into {kv} KV heads", "give a divisor of --heads")
        numels, sharded = (
            _llama_numels(int(layers), int(hidden), ffn, vocab, int(heads), kv, tied)
            if llama
            else _gpt2_numels(int(layers), int(hidden), ffn, vocab, None)
        )
        count = int(_positive("--params", params)) if params is not None else sum(numels)
        return ModelSpec(
            "explicit",
            count,
            int(layers),
            int(hidden),
            int(heads),
            vocab,
            ffn,
            None,
            activation="silu" if llama else "gelu_new",
            attn_dropout=not llama,
            resid_dropout=not llama,
            embd_dropout=not llama,
            largest_layer=max(numels),
            numels=numels,
            exact=params is None,
            family=arch,
            kv_heads=kv,
            tied=tied,
            sharded=sharded,
        )
    return spec_from_config(_load_config(source), source, vocab)


def _load_config(source):
    from transformers import AutoConfig

    from dsrecipes.train.models import load_model_config

    if os.path.isfile(source):
        return load_model_config(source)
    if source.endswith(".json") or source.startswith((".", "/", "~")) and not os.path.isdir(source):
        raise _bad("--model", f"file not found: {source!r}", "give a config.json file, a model directory or a hub name")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - offline hub, bad directory, unknown name: all one-line errors
        fix = (
            "the directory needs a config.json"
            if os.path.isdir(source)
            else "give a config.json file or a local model directory (the hub needs a network and HF_HUB_OFFLINE=0)"
        )
        raise _bad(
            "--model",
            f"cannot read a model config from {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})",
            fix,
        ) from None


def spec_from_config(config, name, vocab):
    def first(*keys, default=None):
        return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)

    if vocab is not None:
        config.vocab_size = int(_positive("--vocab", vocab))
    hidden, layers, heads = (
        first("hidden_size", "n_embd"),
        first("num_hidden_layers", "n_layer"),
        first("num_attention_heads", "n_head"),
    )
    if not (hidden and layers and heads):
        raise _bad(
            "--model",
            f"{name}: no hidden size / layer count / head count in the config",
            "use a transformer config (GPT-2, Llama, BERT ...) or give --layers --hidden --heads",
        )
    ffn = first("n_inner", "intermediate_size", "ffn_dim", default=4 * hidden)
    spec = ModelSpec(
        name,
        0,
        layers,
        hidden,
        heads,
        config.vocab_size,
        ffn,
        first("n_positions", "max_position_embeddings"),
        activation=first("activation_function", "hidden_act", default="gelu"),
        attn_dropout=first("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob", default=0) > 0,
        resid_dropout=first("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", default=0) > 0,
        embd_dropout=first("embd_pdrop", "hidden_dropout", "hidden_dropout_prob", default=0) > 0,
        attention=compat.attn_implementation(config) or "sdpa",
        family="llama" if config.model_type in LLAMA_TYPES or first("num_key_value_heads") else "gpt2",
        kv_heads=first("num_key_value_heads", default=heads),
        head_dim=first("head_dim", default=hidden // heads),
        tied=bool(getattr(config, "tie_word_embeddings", True)),
    )
    try:  # exact count: build the model on the meta device (no memory, no weights)
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
        named = list(model.named_parameters())  # shared (tied) weights once
        spec.numels = tuple(p.numel() for _, p in named)
        spec.sharded = tuple(tp_sharded(n) for n, _ in named)
        spec.largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        spec.exact = True
    except Exception:  # noqa: BLE001 - unknown architecture: GPT-2-shaped estimate, flagged exact=False
        spec.numels, spec.sharded = _gpt2_numels(layers, hidden, ffn, config.vocab_size, spec.positions)
        spec.largest_layer = max(spec.numels)
    spec.params = sum(spec.numels)
    return spec
