"""How close a run is to the machine's limit: model FLOPs utilisation (MFU) and where a step's time goes.

    flops = FlopCounter(train=[model])               # + forward=[teacher] for distillation
    peak = peak_flops(accelerator.device)            # FLOP/s of one device (measured on CPU, GPU table on CUDA)
    timer = StepTimer(accelerator.device)
    with timer.part("forward"): loss = ...           # data | forward | backward | optimizer | communication
    timer.breakdown(total_s)                         # {"seconds": {...}, "fractions": {...}}, "other" = the rest

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B), for a trained model of N parameters, L layers,
width h and sequence length s: 6*N (2*N forward, 4*N backward: every weight takes part in one multiply-add per
token, twice more in backward) plus the attention term 12*L*h*s (QK^T and attention x V: 2*2*L*h*s forward, twice
that backward). A model that only runs forward (a distillation teacher) costs 2*N + 4*L*h*s. N counts every
parameter once (embeddings included, tied matrices once, ZeRO-3 shards at their full size). These are *model*
FLOPs: recomputation under activation checkpointing and the weight gradients that freezing skips are not counted
(MFU, not hardware FLOPs utilisation).

The breakdown (dsrecipes.train.loop times each part with time.perf_counter, after torch.cuda.synchronize on CUDA):
data = waiting for the next micro-batch; forward = the recipe's loss (the teacher's forward included); backward =
accelerator.backward; optimizer = clipping, optimizer.step, zero_grad, the LR schedule and, under DeepSpeed, the
engine's step() that accelerate runs inside backward(); communication = the loop's own collectives (averaging the
logged loss over the ranks, the stop-signal check). DeepSpeed's gradient all-reduce / reduce-scatter runs inside
backward and the engine step and is counted there (it has no separate timer here). other = the rest of the loop's
wall time: logging, eval, checkpoints, freezing rebuilds. The pipeline engine's train_batch interleaves all of them
(1F1B), so that recipe reports it as one part, train_batch (its bubble is measured separately).

The peak: on CUDA, the dense bf16 tensor-core figure of the GPU table (dsrecipes.memory.gpus.BF16_TFLOPS) for
torch.cuda.get_device_name(); on CPU, this process's measured fp32 matmul FLOP/s (best of a few square matmuls on
its own threads), because a CPU has no single published figure that matches how the run uses it.
"""

from __future__ import annotations

import contextlib
import time

import torch

PARTS = ("data", "forward", "backward", "optimizer", "communication")


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"{type(config).__name__} has none of {names}")


def model_shape(model) -> tuple[int, int, int]:
    """(parameters, layers, width) of an HF model, a DeepSpeed engine around one, or a ZeRO-3 partitioned one."""
    from dsrecipes.train.models import count_parameters

    inner = getattr(model, "module", model)
    config = inner.config
    layers = _config_value(config, "n_layer", "num_hidden_layers", "num_layers")
    width = _config_value(config, "n_embd", "hidden_size", "d_model")
    return count_parameters(inner), layers, width


def flops_per_token(params: int, layers: int, width: int, seq_len: int, training: bool = True) -> float:
    """6N + 12*L*h*s when trained, 2N + 4*L*h*s for forward only (see the module docstring)."""
    passes = 3 if training else 1
    return passes * (2.0 * params + 4.0 * layers * width * seq_len)


class FlopCounter:
    """Model FLOPs of one training token for the models a recipe trains and the ones it only runs forward.
    shapes: (params, layers, width) of trained models given by number (a PipelineModule has no HF config)."""

    def __init__(self, train=(), forward=(), shapes=()):
        self.parts = [(model_shape(m), True) for m in train] + [(model_shape(m), False) for m in forward]
        self.parts += [(tuple(shape), True) for shape in shapes]

    def per_token(self, seq_len: int) -> float:
        return sum(flops_per_token(*shape, seq_len, training=t) for shape, t in self.parts)


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_flops(sizes=(256, 512), repeats: int = 4) -> float:
    """Best fp32 matmul FLOP/s of this process on its current torch threads (about 50 ms on one CPU core)."""
    best = 0.0
    gen = torch.Generator().manual_seed(0)  # not the global RNG: measuring must not shift the training stream
    for n in sizes:
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        torch.matmul(a, b)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2.0 * n**3 / max(time.perf_counter() - t0, 1e-9))
    return best


def peak_flops(device) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from). None when a GPU has no bf16 figure in the table."""
    from dsrecipes.memory.gpus import gpu_bf16_tflops

    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_bf16_tflops(name)
        return (None if tflops is None else tflops * 1e12), f"GPU table, dense bf16: {name}"
    return measured_matmul_flops(), f"measured fp32 matmul, {torch.get_num_threads()} thread(s)"


class StepTimer:
    """Seconds spent in each named part of the training steps, with a synchronisation point at every boundary
    on CUDA (kernels are asynchronous there: without it the time would land in whichever part waits next)."""

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._inside = None  # the part being timed: time of nested parts (engine step in backward) moves to them

    @contextlib.contextmanager
    def part(self, name: str):
        outer, self._inside = self._inside, name
        _synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            spent = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + spent  # an engine may name its own part
            if outer is not None:
                self.seconds[outer] -= spent
            self._inside = outer

    def wrap_engine_step(self, engine) -> None:
        """accelerate runs DeepSpeed's engine.step() (clipping, optimizer step, zero_grad) inside backward(): time it
        as the optimizer's. Wraps the instance once; a rebuilt engine (freezing) is wrapped when it is first seen."""
        if engine is None or getattr(engine, "_dsrecipes_timed", False):
            return
        original = engine.step

        def step(*args, **kwargs):
            with self.part("optimizer"):
                return original(*args, **kwargs)

        engine.step = step
        engine._dsrecipes_timed = True

    def breakdown(self, total_s: float) -> dict:
        """Seconds and fractions of total_s per part; "other" (logging, eval, checkpoints, freezing) is the rest.
        A part that was never entered (data of an engine that loads its own batches) reads 0."""
        seconds = {k: max(v, 0.0) for k, v in self.seconds.items()}
        seconds["other"] = max(total_s - sum(seconds.values()), 0.0)
        whole = sum(seconds.values()) or 1.0
        return {"seconds": seconds, "fractions": {k: v / whole for k, v in seconds.items()}}


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int) -> float | None:
    """Achieved model FLOP/s over the peak of all devices."""
    if not peak or not flops_per_token:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
