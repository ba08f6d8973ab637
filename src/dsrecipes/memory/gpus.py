"""GPU memory table, the fits-a-GPU check and --fit's step-time model, for the memory planner
(dsrecipes.memory.planner).

    from dsrecipes.memory.gpus import GPUS, fits, step_cost
    fits(total_bytes, "A100-40GB")      # {"gpu", "memory", "usable", "headroom", "fits"}
    gpu_bf16_tflops("NVIDIA H200")      # 989.0: dense bf16 peak by torch.cuda.get_device_name(), for MFU

Used by `dsrecipes plan` (run: dsrecipes plan --model M --gpu A100-40GB [--fit]); the cost model is explained in
docs/planner.md.
"""

from __future__ import annotations

from dsrecipes.config.errors import ConfigError

GiB = 2**30
# Memory per GPU in GiB (vendor figures). K80 is one of the board's two 12 GB GPUs. Usable = memory x (1 - headroom).
GPUS = {
    "K80": 12,
    "P100-16GB": 16,
    "GTX-1080Ti": 11,
    "RTX-2080Ti": 11,
    "T4": 16,
    "V100-16GB": 16,
    "V100-32GB": 32,
    "RTX-3090": 24,
    "RTX-4090": 24,
    "A10": 24,
    "A10G": 24,
    "L4": 24,
    "RTX-A6000": 48,
    "L40S": 48,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H100-94GB": 94,
    "H200-141GB": 141,
    "B200-180GB": 180,
}
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s per GPU, the MFU denominator (dsrecipes.train.throughput).
# Vendor datasheets; GeForce/RTX figures with FP32 accumulate. None: no bf16 tensor cores (pre-Ampere) or no
# published figure (A10G). H100-80GB is the SXM part (PCIe: 756); H100-94GB is the NVL part.
BF16_TFLOPS = {
    "K80": None,
    "P100-16GB": None,
    "GTX-1080Ti": None,
    "RTX-2080Ti": None,
    "T4": None,
    "V100-16GB": None,
    "V100-32GB": None,
    "RTX-3090": 71.0,
    "RTX-4090": 165.2,
    "A10": 125.0,
    "A10G": None,
    "L4": 121.0,
    "RTX-A6000": 154.8,
    "L40S": 362.1,
    "A100-40GB": 312.0,
    "A100-80GB": 312.0,
    "H100-80GB": 989.0,
    "H100-94GB": 835.0,
    "H200-141GB": 989.0,
    "B200-180GB": 2250.0,
}
DEFAULT_HEADROOM = 0.10  # CUDA context (~0.3-0.5 GiB), NCCL buffers, allocator fragmentation
# --fit's step-time model: multiplicative factors on a ZeRO-0/1/2, no-recompute, AdamW step (docs/planner.md).
COST = {
    "recompute": 1.33,
    "zero3": 1.15,
    "offload_optimizer": 1.5,
    "offload_param": 2.0,
    "adamw_8bit": 1.02,
    "paged_adamw_8bit": 1.05,
    "torchao_adamw_8bit": 1.05,
    "torchao_adamw_4bit": 1.08,
    "sp": 1.10,
    "tp": 1.20,
    "tiled_mlp": 1.25,
}


def gpu_memory(name):
    """GiB of a GPU of the table, by name (case and '-' insensitive; a unique prefix such as H200 works too)."""
    norm = {k.lower().replace("-", ""): k for k in GPUS}
    want = str(name).lower().replace("-", "").replace(" ", "")
    prefixed = [k for n, k in norm.items() if n.startswith(want)] if want else []
    key = norm.get(want) or (prefixed[0] if len(prefixed) == 1 else None)
    if key is None:
        raise ConfigError("<cli>", "--gpu", f"unknown or ambiguous GPU {name!r}", f"use one of {', '.join(GPUS)}")
    return key, GPUS[key]


def _squash(text) -> str:
    return "".join(c for c in str(text).lower() if c.isalnum())


def gpu_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a GPU named as torch.cuda.get_device_name() names it ("NVIDIA A100-SXM4-80GB",
    "NVIDIA GeForce RTX 4090"): the longest table family (A100, RTX4090, L40S, ...) in the name, the memory size
    picking among that family's rows. None for a GPU the table does not know or has no bf16 figure for."""
    name = _squash(device_name)
    families: dict[str, list[str]] = {}
    for key in GPUS:
        family = key.rsplit("-", 1)[0] if key.endswith("GB") else key
        families.setdefault(_squash(family), []).append(key)
    hits = sorted((f for f in families if f in name), key=len, reverse=True)
    if not hits:
        return None
    rows = families[hits[0]]
    key = next((k for k in rows if f"{GPUS[k]}gb" in name), rows[0])
    return BF16_TFLOPS[key]


def fits(total, gpu, headroom=DEFAULT_HEADROOM):
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise ConfigError("<cli>", "--headroom", f"{headroom!r} is not in [0, 1)", "give a fraction such as 0.1")
    name, gib = gpu_memory(gpu)
    usable = int(gib * GiB * (1 - headroom))
    return {"gpu": name, "memory": gib * GiB, "usable": usable, "headroom": headroom, "fits": total <= usable}


def step_cost(zero_stage, offload_optimizer, offload_param, checkpointing, optimizer, sp=1, tp=1, tiled_mlp=False):
    """Relative step time of a setup (1.0 = ZeRO 0-2, no recompute, AdamW in GPU memory, no sp/tp); see COST.
    sp and tp are flat factors for any degree within a node (Ulysses' all-to-all, AutoTP's all-reduces)."""
    cost = COST["recompute"] if checkpointing != "none" else 1.0
    cost *= COST["sp"] if sp > 1 else 1.0
    cost *= COST["tp"] if tp > 1 else 1.0
    cost *= COST["tiled_mlp"] if tiled_mlp else 1.0
    cost *= COST["zero3"] if zero_stage == 3 else 1.0
    cost *= COST["offload_optimizer"] if offload_optimizer else 1.0
    cost *= COST["offload_param"] if offload_param else 1.0
    return round(cost * COST.get(optimizer, 1.0), 4)
