"""The rule table's refusals for LoRA / QLoRA (axis lora).

Part of the one table in dsrecipes.config.rules (which imports LORA_RULES).
"""

from __future__ import annotations

from dsrecipes.config.rules import FROZEN, LORA, Rule, _set

# LoRA (train/lora.py) works with ZeRO 0-3, DDP, checkpointing and 8-bit (tests/test_lora.py); it refuses these
# (recipes/distill.py and train_pipeline.py take no lora_* keys: lora_r is an unknown key there).
LORA_RULES: tuple[Rule, ...] = (
    Rule(
        "lora_freezing",
        {"lora": LORA, "freeze": FROZEN},
        "LoRA already freezes the whole base model and trains only its adapters: the freeze_* keys (static or "
        "progressive freezing, the prefix cache) would have nothing of the base left to freeze",
        "remove the freeze_* keys, or set lora_r: 0 for full fine-tuning with freezing",
        key="lora_r",
    ),
    Rule(
        "qlora_zero3",
        {"lora": _set("qlora"), "zero": _set(3)},
        "ZeRO-3 would partition the packed 4-bit NF4 weights, whose quantization state lives outside the parameter "
        "(peft's DeepSpeed guide: QLoRA + ZeRO-3 needs bnb_4bit_quant_storage equal to the compute dtype; not wired)",
        "use QLoRA with plain DDP or ZeRO 0-2, or LoRA (lora_quantize: none) with ZeRO-3",
        key="lora_quantize",
    ),
)
