"""LoRA and QLoRA through peft: adapters on a built model, adapter-only checkpoints, merged or adapter-only export.

    model, info = apply_lora(model, args, where)       # lora_r > 0: freeze the base, add adapters (peft)
    session.ckpt.trainable_only()                       # checkpoints: the adapter and its optimizer state only
    final = export(accelerator, model, tokenizer, args) # final/ (merged) and/or final_adapter/ (peft)

The adapters are added after the base is built, also when it was built sharded (zero3_init_flag: true): their
parameters are then plain tensors, identical on every rank (drawn from a seed of their own), which
deepspeed.initialize partitions like any other parameter it finds unpartitioned. QLoRA (lora_quantize: nf4)
first stores every nn.Linear of the decoder blocks as a bitsandbytes 4-bit NF4 Linear4bit (frozen, fp32 compute),
then adds fp32 adapters over them; bitsandbytes 0.50 runs its forward and backward on the CPU too.

The merged export gathers the whole state dict (ZeRO-3 too: accelerate's get_state_dict), loads it on rank 0 into a
copy built on the meta device (no second allocation), dequantizes QLoRA's 4-bit weights, and merges with peft's
merge_and_unload: final/ is a plain transformers model that from_pretrained and the server load.

Known peft + DeepSpeed problems this avoids: adapters created outside zero.Init are not partitioned by it
(huggingface/peft#1366; deepspeed.initialize partitions them, so they must be equal on every rank: seeded here);
adapters saved from a ZeRO-3 model are empty (huggingface/accelerate#3508, huggingface/peft#453: gathered first);
merging under ZeRO-3 fails on partitioned weights (huggingface/peft#297: merged on a gathered copy); checkpoints
that carry the frozen base (dreamzero0/dreamzero#90: exclude_frozen_parameters is only passed for a PeftModel by
HF Trainer; Checkpoints.trainable_only passes it), while a ZeRO-3 checkpoint never restores frozen weights
(deepspeedai/DeepSpeed#3090: the base is rebuilt at start-up instead, which is exact since it never changes).
"""

from __future__ import annotations

import contextlib
import os
from copy import deepcopy

import torch

from dsrecipes.config.errors import ConfigError

ADAPTER_DIR = "final_adapter"
LORA_SEED_OFFSET = 0x10_0A  # the adapters' own seed: args.seed + this (their init leaves the global RNG untouched)


def enabled(args) -> bool:
    return int(getattr(args, "lora_r", 0) or 0) > 0


def _linear_types() -> tuple:
    from transformers.pytorch_utils import Conv1D

    types = [torch.nn.Linear, Conv1D]
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb

        types.append(bnb.nn.Linear4bit)
    return tuple(types)


def linear_names(model) -> list[str]:
    """The last name component of every Linear/Conv1D module but the LM head: what lora_target_modules may name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    types = _linear_types()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, types) and m is not head})


def check_args(model, args, where: str) -> list[str] | str:
    """lora_* values that peft would take but that cannot work here: one line each. Returns the target modules."""
    if args.lora_r < 0:
        raise ConfigError(where, "lora_r", f"must be >= 0, got {args.lora_r}", "use 0 (off) or a rank such as 8")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ConfigError(where, "lora_dropout", f"must be in [0, 1), got {args.lora_dropout}", "use e.g. 0.05")
    targets = list(args.lora_target_modules or [])
    if not targets:
        raise ConfigError(where, "lora_target_modules", "is empty", "name modules, or write [all-linear]")
    if [t.lower() for t in targets] == ["all-linear"]:
        return "all-linear"
    names = linear_names(model)
    unknown = [t for t in targets if t not in names]
    if unknown or "all-linear" in [t.lower() for t in targets]:
        bad = unknown or ["all-linear"]
        raise ConfigError(
            where,
            "lora_target_modules",
            f"{bad} not among this model's Linear/Conv1D modules {names}",
            "pick from those names (all-linear alone takes every one)",
        )
    return targets


# ----------------------------------------------------------------------------- QLoRA: the 4-bit base
def quantize_nf4(model, where: str) -> int:
    """Replace every nn.Linear inside the decoder blocks with a frozen bitsandbytes NF4 Linear4bit (fp32 compute).
    Returns how many; none found (GPT-2 keeps its projections in Conv1D) is a one-line error."""
    import bitsandbytes as bnb

    from dsrecipes.compat import guard
    from dsrecipes.train.models import transformer_blocks

    swapped = 0
    for block in transformer_blocks(model):
        for name, module in list(block.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                quant_storage=torch.uint8,
                device="cpu",
            )
            # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks the weight at the first eval forward for a bf16 kernel
            # (asserting out_features % 32 == 0; outputs off by ~1e-2), and a training forward after it fails
            # ("a view of a leaf Variable ... in-place"): eval keeps the training path (compat: bnb_cpu_packed_4bit)
            guard("bnb_cpu_packed_4bit")
            q.support_avx512bf16_for_cpu = False
            q.load_state_dict(module.state_dict())
            q = q.to(module.weight.device)  # Params4bit quantizes when it is moved to its device
            q.requires_grad_(False)
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], q)
            swapped += 1
    if not swapped:
        raise ConfigError(
            where,
            "lora_quantize",
            f"nf4 found no nn.Linear in the decoder blocks of {type(model).__name__} (GPT-2 uses Conv1D)",
            "use a Llama-style model (configs/models/tiny_llama.json) for QLoRA, or lora_quantize: none",
        )
    return swapped


# ----------------------------------------------------------------------------- LoRA itself
def apply_lora(model, args, where: str = "<args>"):
    """-> (peft model, info for summary.json); (model, None) when lora_r is 0."""
    if not enabled(args):
        return model, None
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from dsrecipes.train.models import count_parameters

    targets = check_args(model, args, where)
    quantized = quantize_nf4(model, where) if args.lora_quantize == "nf4" else 0
    chosen = linear_names(model) if targets == "all-linear" else targets
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in chosen for n, m in model.named_modules())
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight as (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # same adapters on every rank, global RNG stream unchanged
        torch.manual_seed(int(args.seed) + LORA_SEED_OFFSET)
        model = get_peft_model(model, config)
    if getattr(args, "gradient_checkpointing", "none") != "none":
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad; the base is frozen
    info = {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "target_modules": sorted(model.peft_config["default"].target_modules),
        "adapter_params": adapter_params(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "quantize": args.lora_quantize,
        "quantized_linears": quantized,
        "export": args.lora_export,
    }
    return model, info


def adapter_params(model) -> int:
    from dsrecipes.train.models import logical_numel

    return sum(logical_numel(p) for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------- export
def _plain_state_dict(unwrapped, state_dict: dict) -> dict:
    """The gathered state dict with every 4-bit weight (QLoRA) replaced by its fp32 dequantization."""
    import bitsandbytes as bnb

    out = dict(state_dict)
    for name, module in unwrapped.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            prefix = f"{name}.weight"
            for key in [k for k in out if k.startswith(prefix + ".")]:
                del out[key]
            w = module.weight
            out[prefix] = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32).cpu()
    return out


def merged_model(unwrapped, state_dict: dict):
    """A plain transformers model: the base with the adapter merged in, built from the gathered `state_dict`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dsrecipes.compat import without_hf_deepspeed_config

    config = unwrapped.get_base_model().config
    with without_hf_deepspeed_config(), torch.device("meta"):
        copy = get_peft_model(AutoModelForCausalLM.from_config(config), deepcopy(unwrapped.peft_config["default"]))
    state = _plain_state_dict(unwrapped, state_dict)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    tied_head = getattr(config, "tie_word_embeddings", False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if tied_head else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"merge: state dict does not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    merged = copy.merge_and_unload()
    merged.tie_weights()
    return merged


def export(accelerator, model, tokenizer, args) -> str:
    """Write final/ (merged), final_adapter/ (peft) or both, as args.lora_export says; returns the first written."""
    from dsrecipes.train.checkpoints import write_dir_atomic

    state_dict = accelerator.get_state_dict(model)  # collective: gathers ZeRO-3 partitions onto rank 0
    unwrapped = accelerator.unwrap_model(model)
    written = []
    if args.lora_export in ("merged", "both"):

        def write_merged(tmp):
            merged_model(unwrapped, state_dict).save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        written.append(write_dir_atomic(accelerator, os.path.join(args.output_dir, "final"), write_merged))
    if args.lora_export in ("adapter", "both"):

        def write_adapter(tmp):
            unwrapped.save_pretrained(tmp, state_dict=state_dict, save_embedding_layers=False)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        written.append(write_dir_atomic(accelerator, os.path.join(args.output_dir, ADAPTER_DIR), write_adapter))
    return written[0]
