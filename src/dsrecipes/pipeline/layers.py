"""A causal LM as a DeepSpeed PipelineModule: the layers, their specs, the partition check and the module.

    config = pipeline_config(args, tokenizer)                      # HF config: gpt2, llama or qwen2
    pipe = build_pipeline(config, num_stages=2, partition_method="type:block", activation_checkpoint_interval=0)
    load_hf_weights(pipe, weight_source(args, config, tokenizer))  # dsrecipes.pipeline.hf_weights
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=opt, config=ds_config)
    meter = BubbleMeter(engine)                                    # dsrecipes.pipeline.bubble: idle time per stage
    export_hf(pipe, config, tokenizer, "out/final")                # dsrecipes.pipeline.hf_weights; collective

GPT-2 layers: [wte, wpe + dropout, block x n_layer, ln_f, lm_head]. With tie_word_embeddings the first and the last
are one TiedLayerSpec("wte"): both stages hold a copy, DeepSpeed all-reduces its gradient after backward.
Llama-family layers (RoPE positions passed through the stages): dsrecipes.pipeline.llama_layers.
Used by recipes/train_pipeline.py (through dsrecipes.pipeline.engine), benchmarks/throughput_pipeline.py and
tests/test_pipeline.py.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from dsrecipes import compat
from dsrecipes.config.errors import ConfigError


# ----------------------------------------------------------------------------- layers
class GPT2TokenEmbeddingPipe(nn.Embedding):
    """wte. Tied: the same module (one copy per stage that uses it) also serves as the LM head."""

    hf_prefix = "transformer.wte."


class GPT2PositionPipe(nn.Module):
    hf_prefix = "transformer."

    def __init__(self, config):
        super().__init__()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, inputs_embeds):
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        return self.drop(inputs_embeds + self.wpe(positions))


class GPT2BlockPipe(GPT2Block):
    """transformers' GPT2Block with a one-tensor interface (SDPA with is_causal: no mask tensor to pass)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        self.hf_prefix = f"transformer.h.{layer_idx}."

    def forward(self, hidden_states):
        return super().forward(hidden_states)


class GPT2FinalNormPipe(nn.LayerNorm):
    hf_prefix = "transformer.ln_f."

    def __init__(self, config):
        super().__init__(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadPipe(nn.Linear):
    """The head of a model with tie_word_embeddings: false."""

    hf_prefix = "lm_head."

    def __init__(self, config):
        super().__init__(config.n_embd, config.vocab_size, bias=False)


def tied_lm_head(embedding, hidden_states):
    return F.linear(hidden_states, embedding.weight)


def causal_lm_loss(logits, labels):
    """transformers' own causal-LM loss: shift by one, mean cross-entropy over labels != -100."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


# Segments made only of these run under activation checkpointing (the token embedding takes integer ids, so
# DeepSpeed's reentrant checkpoint could not give it gradients; the tied head is a function, never checkpointed).
CHECKPOINTABLE = ["GPT2PositionPipe", "GPT2BlockPipe", "GPT2FinalNormPipe", "GPT2LMHeadPipe"]


# ----------------------------------------------------------------------------- config and specs
def pipeline_config(args, tokenizer=None):
    """The HF config of model_name_or_path (a local dir) or of model_config: GPT-2 or a Llama-family model."""
    from transformers import AutoConfig

    from dsrecipes.train.models import load_model_config

    if args.model_name_or_path:
        try:
            config = AutoConfig.from_pretrained(args.model_name_or_path)
        except Exception as exc:  # noqa: BLE001 - any failure is a bad model input
            raise ConfigError(
                "<args>",
                "model_name_or_path",
                f"cannot load the config of {args.model_name_or_path!r} ({type(exc).__name__})",
                "give a local HF model directory (an exported final/ works)",
            ) from None
        where = args.model_name_or_path
    else:
        config, where = load_model_config(args.model_config, tokenizer), args.model_config
    from dsrecipes.pipeline.llama_layers import FAMILIES

    if config.model_type != "gpt2" and config.model_type not in FAMILIES:
        raise ConfigError(
            where,
            "model_type",
            f"{config.model_type!r} is not supported by the pipeline recipe",
            f"use one of {['gpt2', *FAMILIES]}",
        )
    if getattr(config, "use_sliding_window", False):
        raise ConfigError(
            where,
            "use_sliding_window",
            "sliding-window attention needs a mask the pipeline does not pass",
            "set it false",
        )
    if getattr(config, "add_cross_attention", False):
        raise ConfigError(
            where, "add_cross_attention", "cross-attention models cannot be pipelined here", "set it to false"
        )
    config = copy.deepcopy(config)
    compat.set_attn_implementation(config, "sdpa")  # causal without a mask tensor; the HF model's kernel on CPU
    return config


def hf_names(config) -> dict:
    """HF parameter names: {"embeddings": prefixes, "block": regex with the block index, "embedding_weight"}."""
    if config.model_type != "gpt2":
        from dsrecipes.pipeline.llama_layers import hf_names as llama_names

        return llama_names(config)
    return {
        "embeddings": ("transformer.wte.", "transformer.wpe."),
        "block": r"transformer\.h\.(\d+)\.",
        "embedding_weight": "transformer.wte.weight",
    }


def checkpointable_layers(config) -> list[str]:
    if config.model_type == "gpt2":
        return CHECKPOINTABLE
    from dsrecipes.pipeline.llama_layers import checkpointable

    return checkpointable(config.model_type)


def layer_specs(config) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if config.model_type != "gpt2":
        from dsrecipes.pipeline.llama_layers import llama_layer_specs

        return llama_layer_specs(config)

    vocab, hidden = config.vocab_size, config.n_embd
    if config.tie_word_embeddings:
        first = TiedLayerSpec("wte", GPT2TokenEmbeddingPipe, vocab, hidden, tied_weight_attr="weight")
        last = TiedLayerSpec(
            "wte", GPT2TokenEmbeddingPipe, vocab, hidden, forward_fn=tied_lm_head, tied_weight_attr="weight"
        )
    else:
        first, last = LayerSpec(GPT2TokenEmbeddingPipe, vocab, hidden), LayerSpec(GPT2LMHeadPipe, config)
    blocks = [LayerSpec(GPT2BlockPipe, config, i) for i in range(config.n_layer)]
    return [first, LayerSpec(GPT2PositionPipe, config), *blocks, LayerSpec(GPT2FinalNormPipe, config), last]


def check_partition(specs, num_stages: int, method: str, where: str = "<args>") -> None:
    if num_stages < 1:
        raise ConfigError(where, "num_stages", f"{num_stages} stages", "use 1 or more")
    if len(specs) < num_stages:
        raise ConfigError(where, "num_stages", f"{num_stages} stages for {len(specs)} layers", "use fewer stages")
    low = method.lower()
    if low in ("parameters", "uniform"):
        return
    if not low.startswith("type:"):
        raise ConfigError(
            where,
            "partition_method",
            f"{method!r} is not a partition method",
            "use parameters, uniform or type:<regex> (e.g. type:block)",
        )
    try:
        pattern = re.compile(low.split(":")[1], re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(where, "partition_method", f"bad regex in {method!r} ({exc})", "fix the regex") from None
    names = [s.typename.__name__ for s in specs]
    hits = sum(1 for n in names if pattern.search(n))
    if hits < num_stages:
        raise ConfigError(
            where,
            "partition_method",
            f"{method!r} matches {hits} layer(s) of {sorted(set(names))}, fewer than num_stages={num_stages}",
            "match more layers, e.g. type:block",
        )


def build_pipeline(
    config,
    num_stages: int,
    partition_method: str = "type:block",
    activation_checkpoint_interval: int = 0,
    where: str = "<args>",
    activation_checkpoint_func=None,
):
    """A PipelineModule; each rank builds only its stage's layers (needs torch.distributed initialised).
    activation_checkpoint_func: None = DeepSpeed's reentrant checkpoint (see dsrecipes.pipeline.techniques)."""
    from deepspeed.pipe import PipelineModule

    specs = layer_specs(config)
    check_partition(specs, num_stages, partition_method, where)
    if activation_checkpoint_interval < 0:
        raise ConfigError(
            where, "activation_checkpoint_interval", f"{activation_checkpoint_interval}", "use 0 (off) or k >= 1"
        )
    pipe = PipelineModule(
        layers=specs,
        num_stages=num_stages,
        loss_fn=causal_lm_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=checkpointable_layers(config),
        **({"activation_checkpoint_func": activation_checkpoint_func} if activation_checkpoint_func else {}),
    )
    compat.flag_pipeline_params_for_clipping(pipe)  # ZeRO-0 clipping counts every stage (see dsrecipes.compat)
    return pipe
