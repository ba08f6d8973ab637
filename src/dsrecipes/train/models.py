"""Model building shared by the recipes.

    model = build_causal_lm(model_args, tokenizer)   # from_pretrained(dir or hub name), or from a config file
    n = count_parameters(model)

No network on the default path: the tiny model is built from configs/models/*.json. A hub name still goes
through the usual `from_pretrained` for users who have a network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os

from dsrecipes.config.errors import ConfigError


def load_model_config(path: str, tokenizer=None):
    """An HF config object from a config.json-style file; vocab and special ids follow the tokenizer."""
    from transformers import AutoConfig

    if not os.path.isfile(path):
        raise ConfigError(
            "<args>", "model_config", f"file not found: {path!r}", "give a config.json file (see configs/models/)"
        )
    try:
        with open(path) as fh:
            values = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, "-", f"invalid JSON ({exc.msg} at line {exc.lineno})", "fix the JSON syntax") from None
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ConfigError(path, "model_type", "missing", 'add e.g. "model_type": "gpt2"')
    try:
        config = AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise ConfigError(
            path, "model_type", str(exc).splitlines()[0], "use a transformers model type such as gpt2 or llama"
        ) from None
    if tokenizer is not None:
        config.vocab_size = len(tokenizer)
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return config


@contextlib.contextmanager
def zero3_init_scope(accelerator):
    """Build models sharded (deepspeed.zero.Init) only when the accelerate config says zero3_init_flag: true.

    accelerate 1.15 registers its ZeRO-3 config with transformers whatever the flag says, so from_config and
    from_pretrained would always build under zero.Init. Building sharded is only needed when the model does not
    fit one device unsharded; either way a from-config model gets the same weights (init_by_name).
    """
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from dsrecipes.compat import without_hf_deepspeed_config

    with without_hf_deepspeed_config():
        yield


def build_causal_lm(model_args, tokenizer=None, config_overrides: dict | None = None, accelerator=None):
    """AutoModelForCausalLM from model_name_or_path, or freshly initialised from model_config."""
    with zero3_init_scope(accelerator):
        model = _build_causal_lm(model_args, tokenizer, config_overrides)
    return model


def _build_causal_lm(model_args, tokenizer, config_overrides):
    from transformers import AutoModelForCausalLM

    if model_args.model_name_or_path:
        src = model_args.model_name_or_path
        try:
            return AutoModelForCausalLM.from_pretrained(src, **(config_overrides or {}))
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad model input
            local = os.path.isdir(src)
            fix = (
                "the directory needs config.json and model weights (an exported final/ works)"
                if local
                else "give a local model directory, or a hub name with a network (HF_HUB_OFFLINE=0)"
            )
            raise ConfigError(
                "<args>",
                "model_name_or_path",
                f"cannot load {src!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
                fix,
            ) from None
    config = load_model_config(model_args.model_config, tokenizer)
    for k, v in (config_overrides or {}).items():
        setattr(config, k, v)
    import torch

    seed = torch.initial_seed()  # set_seed(args.seed) before the build sets it
    rng = torch.random.get_rng_state()
    model = AutoModelForCausalLM.from_config(config)
    init_by_name(model, seed)
    # The unsharded constructor draws torch's default init, zero.Init does not: leave the RNG as it was.
    torch.random.set_rng_state(rng)
    return model


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_by_name(model, seed: int) -> None:
    """Re-initialise every module of an HF model from a seed derived from its qualified name.

    The weights then depend only on (seed, module name, shape), not on how many random numbers the build drew
    before: a model built sharded (zero.Init, where each module's parameters are gathered to rank 0 for its init)
    gets exactly the weights of an unsharded build. Same order as transformers' own init: children first; a
    module's init may touch its direct children's parameters (GPT-2's scaled c_proj), so those are gathered too.
    """
    import torch
    from transformers import PreTrainedModel

    from dsrecipes.compat import hf_init_weights

    def visit(module, name, fn):
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            visit(child, full, hf_init_weights(child) if isinstance(child, PreTrainedModel) else fn)
        params = list(module.parameters(recurse=False))
        for child in module.children():
            if not isinstance(child, PreTrainedModel):
                params.extend(child.parameters(recurse=False))
        sharded = [p for p in params if hasattr(p, "ds_id")]
        with _gathered(sharded) as modifier:
            if modifier:
                torch.manual_seed(_name_seed(seed, name))
                fn(module)

    with torch.no_grad():
        visit(model, "", hf_init_weights(model))
    model.tie_weights()


@contextlib.contextmanager
def _gathered(params):
    """Yields True where this rank may write the parameters: always when unsharded, rank 0 under ZeRO-3."""
    if not params:
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield deepspeed.comm.get_rank() == 0


def count_parameters(model, trainable_only: bool = False) -> int:
    """Parameter count; under ZeRO-3 uses the full (ds_numel) size, not the local shard; a bitsandbytes 4-bit weight
    (QLoRA's Params4bit) counts its logical shape (quant_state.shape), not the packed uint8 storage (half as many)."""
    return sum(logical_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def logical_numel(p) -> int:
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return math.prod(shape)
    return getattr(p, "ds_numel", p.numel())


BLOCK_PATHS = (  # where HF causal LMs keep their decoder blocks
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",
    "bert.encoder.layer",
    "encoder.layer",
    "h",
    "layers",
)
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")  # learned; RoPE models have none
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


def _path(model, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def transformer_blocks(model):
    """The ModuleList of transformer blocks of a GPT-2/Llama/Qwen2/BERT-style HF model."""
    import torch

    for path in BLOCK_PATHS:
        obj = _path(model, path)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(
        "<args>",
        "model_name_or_path",
        f"cannot find the transformer blocks of {type(model).__name__}",
        "use a GPT-2, Llama or BERT-style model",
    )


def embedding_modules(model) -> list:
    """Token embeddings, plus the learned position embeddings where the model has them (GPT-2's wpe; not RoPE)."""
    import torch

    emb = [model.get_input_embeddings()]
    for name in POSITION_EMBEDDINGS:
        for _, mod in model.named_modules():
            if isinstance(getattr(mod, name, None), torch.nn.Module):
                emb.append(getattr(mod, name))
                break
    return emb


def decoder_parts(model) -> dict:
    """Architecture-neutral view of an HF causal LM: {"blocks", "embeddings", "final_norm", "head", "tied"}.

    GPT-2: transformer.h / [wte, wpe] / transformer.ln_f / lm_head; Llama, Qwen2: model.layers / [embed_tokens] /
    model.norm / lm_head. final_norm is None where the model has none; tied says whether the head shares the
    token embedding matrix."""
    blocks = transformer_blocks(model)
    base = getattr(model, "base_model", model)
    final_norm = next((getattr(base, n) for n in FINAL_NORMS if getattr(base, n, None) is not None), None)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    embeddings = embedding_modules(model)
    return {"blocks": blocks, "embeddings": embeddings, "final_norm": final_norm, "head": head, "tied": tied}
