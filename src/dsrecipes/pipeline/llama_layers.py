"""Llama-family causal LMs (llama, qwen2: RoPE, RMSNorm, SwiGLU, grouped-query attention) as pipeline layers.

    specs = llama_layer_specs(config)      # what dsrecipes.pipeline.layers.layer_specs returns for these model types
    names = hf_names(config)               # HF parameter names of the embedding and the blocks (freezing, tied head)

Layers: [embed_tokens, decoder layer x num_hidden_layers, final RMSNorm, lm_head]. The token embedding emits
(hidden, position_ids); every decoder layer takes and returns that pair, so the RoPE positions travel through
the stages with the activations (DeepSpeed sends the integer tensor along and gives it no gradient), and each
layer computes its cos/sin from them with the model's own rotary module (no parameters, nothing in the state
dict). The decoder layer, rotary module and RMSNorm are transformers' classes of the model's family, so the
numbers are the unsplit HF model's. Attention is SDPA with no mask tensor (causal); a row is one sequence.
With tie_word_embeddings the embedding and the head are one TiedLayerSpec("embed"), as for GPT-2.
Used by dsrecipes.pipeline.layers (build_pipeline), tests/test_pipeline_llama.py.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

# model_type -> transformers class prefix. Mistral is not here: its sliding window (default 4096) needs the mask
# this pipeline does not pass; it would be exact only for sequences within the window, and is untested.
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2"}
_CLASSES: dict = {}


def family_classes(model_type: str) -> dict:
    """{"block", "norm", "rotary"}: pipeline layer classes for one family, built once (stable class names, which
    partition_method type:<regex> and the checkpointable-layer list match)."""
    if model_type in _CLASSES:
        return _CLASSES[model_type]
    prefix = FAMILIES[model_type]
    hf = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    layer_cls, norm_cls, rotary_cls = (getattr(hf, prefix + n) for n in ("DecoderLayer", "RMSNorm", "RotaryEmbedding"))

    def block_init(self, config, layer_idx: int):
        layer_cls.__init__(self, config, layer_idx)
        self.rotary_emb = rotary_cls(config)  # inv_freq is a non-persistent buffer: not a weight of the layer
        self.hf_prefix = f"model.layers.{layer_idx}."

    def block_forward(self, inputs):
        hidden, positions = inputs
        cos_sin = self.rotary_emb(hidden, positions)
        out = layer_cls.forward(self, hidden, position_ids=positions, position_embeddings=cos_sin)
        return out, positions

    def norm_init(self, config):
        norm_cls.__init__(self, config.hidden_size, eps=config.rms_norm_eps)

    def norm_forward(self, inputs):
        return norm_cls.forward(self, inputs[0] if isinstance(inputs, tuple) else inputs)

    block = type(f"{prefix}DecoderBlockPipe", (layer_cls,), {"__init__": block_init, "forward": block_forward})
    norm = type(
        f"{prefix}FinalNormPipe",
        (norm_cls,),
        {"__init__": norm_init, "forward": norm_forward, "hf_prefix": "model.norm."},
    )
    _CLASSES[model_type] = {"block": block, "norm": norm, "rotary": rotary_cls}
    return _CLASSES[model_type]


class LlamaTokenEmbeddingPipe(nn.Embedding):
    """embed_tokens (padding_idx as in the HF model: that row gets no gradient). -> (hidden, position_ids 0..seq-1).
    Tied: the same module (one copy per stage that uses it) also serves as the LM head."""

    hf_prefix = "model.embed_tokens."
    is_token_embedding = True

    def __init__(self, config):
        pad = config.pad_token_id
        super().__init__(config.vocab_size, config.hidden_size, pad if pad is not None and pad >= 0 else None)

    def forward(self, input_ids):
        hidden = super().forward(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).repeat(input_ids.shape[0], 1)
        return hidden, positions


class LlamaLMHeadPipe(nn.Linear):
    """The head of a model with tie_word_embeddings: false."""

    hf_prefix = "lm_head."

    def __init__(self, config):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)


def checkpointable(model_type: str) -> list[str]:
    """Layer classes that may run under activation checkpointing (not the embedding: it takes integer ids)."""
    c = family_classes(model_type)
    return [c["block"].__name__, c["norm"].__name__, LlamaLMHeadPipe.__name__]


def hf_names(config) -> dict:
    return {
        "embeddings": ("model.embed_tokens.",),
        "block": r"model\.layers\.(\d+)\.",
        "embedding_weight": "model.embed_tokens.weight",
    }


def llama_layer_specs(config) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    from dsrecipes.pipeline.layers import tied_lm_head

    c = family_classes(config.model_type)
    if config.tie_word_embeddings:
        first = TiedLayerSpec("embed", LlamaTokenEmbeddingPipe, config, tied_weight_attr="weight")
        last = TiedLayerSpec(
            "embed", LlamaTokenEmbeddingPipe, config, forward_fn=tied_lm_head, tied_weight_attr="weight"
        )
    else:
        first, last = LayerSpec(LlamaTokenEmbeddingPipe, config), LayerSpec(LlamaLMHeadPipe, config)
    blocks = [LayerSpec(c["block"], config, i) for i in range(config.num_hidden_layers)]
    return [first, *blocks, LayerSpec(c["norm"], config), last]
