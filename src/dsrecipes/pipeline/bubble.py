"""The pipeline bubble, measured: each stage's idle time inside engine.train_batch, against (p - 1) / (m + p - 1).

meter = BubbleMeter(engine)
with meter.step():
    engine.train_batch(batches)
record.update(meter.collect())          # collective: idle fraction per stage since the last collect
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from dsrecipes import compat


# ----------------------------------------------------------------------------- bubble meter
def bubble_formula(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


class BubbleMeter:
    """Measures each stage's idle (bubble) time in train_batch by timing the engine's pipeline instructions.

    busy   = the stage's ForwardPass + BackwardPass instructions (its compute, loss included)
    window = train_batch start -> every stage of this pipeline has finished its last backward (a barrier over
             the pipe group right before OptimizerStep, so a stage that finishes early keeps counting idle time)
    idle   = window - busy: waiting in send/recv (the bubble), p2p copies, loading micro-batches, tied all-reduce
    The optimizer step is outside the window, as in the formula (p - 1) / (m + p - 1) for equal stages.
    """

    BUSY = ("ForwardPass", "BackwardPass")
    P2P = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")
    KEYS = ("busy", "window", "p2p", "other", "step", "steps")

    def __init__(self, engine, warmup_steps: int = 1):
        self.engine, self.warmup_steps = engine, warmup_steps
        self.active, self.seen = False, 0
        self.cur, self.acc, self.total = (defaultdict(float) for _ in range(3))
        self.per_step = []  # (busy, window) of each measured step, for the per-step median
        table = compat.pipe_instruction_table(engine)
        for kind, fn in table.items():
            table[kind] = self._timed(kind.__name__, fn)
        compat.install_pipe_instruction_table(engine, table)  # this engine instance only

    def _timed(self, name, fn):
        meter = self

        def run(engine, **kwargs):
            if not meter.active:
                return fn(engine, **kwargs)
            if name == "OptimizerStep":
                dist.barrier(group=engine.grid.get_pipe_parallel_group())
                meter.cur["window"] += time.perf_counter() - meter._t0
            t = time.perf_counter()
            out = fn(engine, **kwargs)
            dt = time.perf_counter() - t
            meter.cur["busy" if name in meter.BUSY else "p2p" if name in meter.P2P else "other"] += dt
            return out

        return run

    @contextlib.contextmanager
    def step(self):
        """Wrap one engine.train_batch call."""
        self.cur.clear()
        self.active, self._t0 = True, time.perf_counter()
        try:
            yield
        finally:
            self.active = False
            self.cur["step"] = time.perf_counter() - self._t0
            self.cur["steps"] = 1
            self.seen += 1
            for k, v in self.cur.items():
                self.acc[k] += v
                if self.seen > self.warmup_steps:  # the first train_batch also exchanges shapes and allocates
                    self.total[k] += v
            if self.seen > self.warmup_steps:
                self.per_step.append((self.cur["busy"], self.cur["window"]))

    def collect(self, total: bool = False) -> dict:
        """Collective: idle fractions per stage (averaged over data-parallel replicas) since the last collect, or
        with total=True over every step after the warm-up."""
        src = self.total if total else self.acc
        mine = torch.tensor([src[k] for k in self.KEYS], dtype=torch.float64)
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        if not total:
            self.acc.clear()
        grid, stages = self.engine.grid, self.engine.num_stages
        per_stage = [torch.zeros_like(mine) for _ in range(stages)]
        for rank, part in enumerate(parts):
            per_stage[compat.pipe_stage_of_rank(grid, rank)] += part
        busy, window, p2p, _, step, steps = (list(x) for x in zip(*[s.tolist() for s in per_stage]))
        idle = [(w - b) / w if w > 0 else 0.0 for b, w in zip(busy, window)]
        n = max(steps[0], 1.0)
        extra = self._per_step_median(stages) if total else {}
        return {
            **extra,
            "bubble_measured": sum(idle) / stages,
            "bubble_formula": bubble_formula(stages, self.engine.micro_batches),
            "stage_idle_fraction": idle,
            "stage_p2p_fraction": [c / w if w > 0 else 0.0 for c, w in zip(p2p, window)],
            "stage_busy_s": [b / n for b in busy],
            "window_s": window[0] / n,
            "step_time_s": step[0] / n,
            "measured_steps": int(steps[0] / (dist.get_world_size() // stages)),
        }

    def _per_step_median(self, stages: int) -> dict:
        """Collective: each measured step's idle fraction (mean over stages and replicas), and their median, which a
        burst of other load on a shared machine moves less than the pooled sum over steps."""
        mine = torch.tensor(self.per_step or [(0.0, 0.0)], dtype=torch.float64)
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        if not self.per_step:
            return {}
        fractions = torch.stack([(p[:, 1] - p[:, 0]) / p[:, 1].clamp_min(1e-12) for p in parts])  # ranks x steps
        per_step = fractions.mean(0)  # every stage has the same number of replicas: mean over ranks = over stages
        return {
            "bubble_per_step": [round(x, 4) for x in per_step.tolist()],
            "bubble_measured_median": float(per_step.median()),
        }
