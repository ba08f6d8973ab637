"""LoRA / QLoRA fields of the training recipes (dsrecipes.train.lora applies them).

lora_r: 8                       # 0 = off (full fine-tuning)
lora_target_modules: [c_attn]   # or all-linear; GPT-2 Conv1D: c_attn c_proj c_fc; Llama: q_proj k_proj ...
lora_export: merged             # final/ with the adapter merged | adapter: final_adapter/ | both
"""

from dataclasses import dataclass

from dsrecipes.config.fields import _f


@dataclass
class LoraArguments:
    lora_r: int = _f(0, "LoRA rank (peft); 0 = off: full fine-tuning. The base model is frozen, only adapters train.")
    lora_alpha: int = _f(16, "LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r.")
    lora_dropout: float = _f(0.0, "Dropout on the adapter's input.")
    lora_target_modules: list[str] = _f(
        ["all-linear"],
        "Module names that get adapters: all-linear (every Linear/Conv1D but the LM head), or names such as GPT-2's "
        "c_attn c_proj c_fc (Conv1D) or Llama's q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.",
    )
    lora_export: str = _f(
        "merged",
        "merged: final/ holds the base with the adapter merged in (plain from_pretrained loads it) | adapter: "
        "final_adapter/ (peft save_pretrained; PeftModel.from_pretrained loads it onto the base) | both.",
        choices=["merged", "adapter", "both"],
    )
    lora_quantize: str = _f(
        "none",
        "QLoRA: nf4 stores the frozen base's Linear weights in 4-bit NF4 (bitsandbytes Linear4bit; Llama-style "
        "models) and trains fp32 adapters over them | none.",
        choices=["none", "nf4"],
    )
