"""What the memory planner knows about a model: a ModelSpec from a config.json, a model directory, a hub name or
explicit shape numbers (exact parameter tensors when the model builds on the meta device).

    spec = load_model_spec("configs/models/tiny_gpt2.json", vocab=257)
    spec = load_model_spec(layers=32, hidden=4096, heads=32, params=7e9)
Used by dsrecipes.memory.planner.
"""

from __future__ import annotations

import dataclasses
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


def _bad(key, problem, fix, where="<cli>"):
    return ConfigError(where, key, problem, fix)


def _positive(key, value, allow_zero=False):
    if value is None or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise _bad(key, f"{value!r} must be a {'non-negative' if allow_zero else 'positive'} number", f"give {key} > 0")
    return value


def _gpt2_numels(layers, hidden, ffn, vocab, positions):
    h, f = hidden, ffn
    block = (h, h, 3 * h * h, 3 * h, h * h, h, h, h, h * f, f, f * h, h)
    return (vocab * h, (positions or 1024) * h) + block * layers + (h, h)


def load_model_spec(source=None, *, params=None, layers=None, hidden=None, heads=None, vocab=None, ffn=None):
    """A ModelSpec from a config.json file, a local model directory, a hub name, or explicit shape numbers."""
    if source is None:
        for key, value in (("--layers", layers), ("--hidden", hidden), ("--heads", heads)):
            _positive(key, value)
        vocab = int(_positive("--vocab", vocab if vocab is not None else 50257))
        ffn = int(_positive("--ffn", ffn if ffn is not None else 4 * hidden))
        if hidden % heads:
            raise _bad("--heads", f"hidden {hidden} is not divisible by {heads} heads", "give a divisor of --hidden")
        numels = _gpt2_numels(int(layers), int(hidden), ffn, vocab, None)
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
            largest_layer=max(numels),
            numels=numels,
            exact=params is None,
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
    )
    try:  # exact count: build the model on the meta device (no memory, no weights)
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
        spec.numels = tuple(p.numel() for p in model.parameters())  # shared (tied) weights once
        spec.largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        spec.exact = True
    except Exception:  # noqa: BLE001 - unknown architecture: GPT-2-shaped estimate, flagged exact=False
        spec.numels = _gpt2_numels(layers, hidden, ffn, config.vocab_size, spec.positions)
        spec.largest_layer = max(spec.numels)
    spec.params = sum(spec.numels)
    return spec
