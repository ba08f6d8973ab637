"""Model building shared by the recipes.

    model = build_causal_lm(model_args, tokenizer)   # from_pretrained(dir or hub name), or from a config file
    n = count_parameters(model)

No network on the default path: the tiny model is built from configs/models/*.json. A hub name still goes
through the usual `from_pretrained` for users who have a network.
"""

from __future__ import annotations

import contextlib
import json
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
    from_pretrained would always build under zero.Init. That draws a different init RNG stream (ZeRO-3 would
    not match ZeRO 0-2) and is only needed when the model does not fit one device unsharded.
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
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if (
        plugin is not None
        and plugin.zero3_init_flag
        and plugin.zero_stage == 3
        and getattr(model.config, "tie_word_embeddings", False)
    ):
        # Measured here (deepspeed 0.19.8, cpu accelerator): GPT-2 built under zero.Init with tied embeddings
        # trains, but its eval loss drifts far above the train loss (9.3 vs 2.8 after 20 steps); untied or
        # built unsharded (zero3_init_flag: false) it matches ZeRO 0-2. Say so rather than fail silently.
        import warnings

        warnings.warn(
            "ZeRO-3 with zero3_init_flag: true and tied word embeddings gave wrong eval losses in our "
            "tests (see README); use zero3_init_flag: false unless the model does not fit unsharded",
            stacklevel=2,
        )
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
    return AutoModelForCausalLM.from_config(config)


def count_parameters(model, trainable_only: bool = False) -> int:
    """Parameter count; under ZeRO-3 uses the full (ds_numel) size, not the local shard."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def transformer_blocks(model):
    """The ModuleList of transformer blocks of a GPT-2/Llama/BERT-style HF model."""
    import torch

    for path in (
        "transformer.h",
        "model.layers",
        "model.decoder.layers",
        "gpt_neox.layers",
        "bert.encoder.layer",
        "encoder.layer",
        "h",
        "layers",
    ):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(
        "<args>",
        "model_name_or_path",
        f"cannot find the transformer blocks of {type(model).__name__}",
        "use a GPT-2, Llama or BERT-style model",
    )
