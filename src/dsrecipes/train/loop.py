"""The one resumable training loop every recipe shares. A recipe supplies the loss; the loop owns the rest.

    session = Session(accelerator, args, stop, project="train_lm", where=config_path)  # checkpoints, resume, log
    freezer = Freezer(model, args, accelerator, resumed=session.resumed_freezer())  # before the optimizer
    ... build the optimizer, accelerator.prepare(...) ...
    loop = Loop(session, args, freezer=freezer, flops=FlopCounter(train=[model]))
    loop.run(model, optimizer, scheduler, train_dl, eval_dl, compute_loss, probe=probe)
    summary = {"recipe": "train_lm", **loop.summary(), ...}

compute_loss(model, batch) -> (loss tensor, {name: float}) is the recipe's hook: plain CE for train_lm, KL*T^2 + CE
+ cosine for distillation. The loop owns gradient accumulation (accelerate's accumulate), clipping, the optimizer
step and LR schedule, logging (metrics.jsonl, tensorboard, the tqdm bar with MFU; the logged loss and terms are
means over the steps since the last logged step, as in HF Trainer, and `step_loss` is the step's own), eval
(evaluate_lm), freezing (Freezer.after_step may rebuild model/optimizer/scheduler), checkpoint/resume (atomic,
keep-last-K, exact: RNG, data position via skip_first_batches, the open logging window), preemption
(SIGUSR1/SIGTERM: checkpoint at the next step boundary) and the throughput figures (MFU, step-time breakdown;
dsrecipes.train.throughput).

A run may have phases (distillation, then the same student from scratch): each phase is a Loop with its own
`phase` name and a `step_offset`, so the checkpoints of all phases live in one directory with increasing step
numbers and `--resume_from latest` finds the newest wherever it is; the trainer state records the phase.
Loop.drive(step_fn, ...) is the engine-neutral part (logging, eval, checkpoints, preemption, summary) for engines
that do a whole optimizer step in one call, such as DeepSpeed's PipelineEngine.train_batch.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from tqdm.auto import tqdm

from dsrecipes.config.errors import ConfigError
from dsrecipes.parallel import tensor
from dsrecipes.train import elastic, watchdog
from dsrecipes.train.checkpoints import Checkpoints
from dsrecipes.train.lock import lock_output_dir
from dsrecipes.train.runlog import RunLog, perplexity
from dsrecipes.train.throughput import StepTimer, mfu, peak_flops


def lm_loss(model, batch):
    """The plain causal-LM hook: the model's own next-token cross-entropy, no extra terms."""
    return model(**batch).loss, {}


class Session:
    """What one run keeps across its phases: checkpoints, the resume point, metrics.jsonl, trackers, the stop flag.
    `acc` is an Accelerator or anything with its few members that Checkpoints uses (e.g. pipeline.engine.EngineRun).
    """

    def __init__(self, acc, args, stop, project: str | None = None, where: str | None = None):
        self.acc, self.args, self.stop, self.where = acc, args, stop, where or "<args>"
        watchdog.start()  # a rank whose launcher dies exits at once (StopFlag started it already in recipes)
        self.lock = lock_output_dir(acc, args.output_dir)  # before anything is written; released at exit
        self.ckpt = Checkpoints(acc, args.output_dir, keep_last=args.save_total_limit)
        self.resume_path = self.ckpt.resolve(args.resume_from)
        self.state = self.ckpt.read_state(self.resume_path) if self.resume_path else {}
        # Written by another number of processes: load through a universal checkpoint (dsrecipes.train.elastic)
        self.elastic = elastic.plan_resume(acc, self.resume_path, self.state, args, self.where)
        if self.elastic is not None:
            self.state = self.elastic.translate(self.state)
        self.log = RunLog(
            args.output_dir,
            enabled=acc.is_main_process,
            resume_step=self.state.get("step", 0),
            keep_lines=self.state.get("log_lines"),
        )
        self.tracking, self.writer = False, None
        if project is not None and args.report_to != "none":
            if hasattr(acc, "init_trackers"):  # accelerate's trackers: output_dir/tensorboard
                config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
                acc.init_trackers(project, config=config)
                self.tracking = True
            elif acc.is_main_process:  # an engine without accelerate (the pipeline): the same directory, by hand
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))

    @property
    def phase(self) -> str | None:
        """The phase the resume checkpoint was written in (None: not resuming, or a run without phases)."""
        return self.state.get("phase")

    def resume_state(self, phase: str | None = None) -> dict:
        """The trainer state to resume `phase` from; {} when the checkpoint belongs to another phase or none."""
        return self.state if self.state and self.state.get("phase") == phase else {}

    def resumed_freezer(self, phase: str | None = None) -> dict:
        return self.resume_state(phase).get("freezer") or {}

    def track(self, values: dict, step: int) -> None:
        if self.tracking:
            self.acc.log(values, step=step)
        elif self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()

    def print(self, *text) -> None:
        if self.acc.is_main_process:
            print(*text, flush=True)


def _mean_across(acc, values: torch.Tensor) -> list[float]:
    """Mean over the ranks, element by element (float32 unless given float64)."""
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    values = values.detach().reshape(-1).to(acc.device, dtype)
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="mean")
    return values.tolist()


class Loop:
    """One phase of training: max_steps optimizer steps, resumable at any step boundary."""

    def __init__(self, session, args, freezer=None, flops=None, phase=None, step_offset=0, extra_state=None):
        self.session, self.acc, self.args = session, session.acc, args
        self.freezer, self.flops, self.phase, self.offset = freezer, flops, phase, step_offset
        self.extra_state = extra_state or {}
        state = session.resume_state(phase)
        self.resumed_from = session.resume_path if state else None
        self.step, self.epoch, self.batch_in_epoch = (
            state.get("step", 0),
            state.get("epoch", 0),
            state.get("batch_in_epoch", 0),
        )
        self.first_loss, self.train_loss, self.eval_loss = (
            state.get("first_loss"),
            state.get("last_loss"),
            state.get("eval_loss"),
        )
        # Sums of the step loss (and of each logged term) since the last logged step, and how many steps: what is
        # logged is their mean, as in HF Trainer; carried in the checkpoint so that a resumed run logs the same.
        window = state.get("loss_window") or {}
        self.window_sums, self.window_steps = dict(window.get("sums", {})), window.get("steps", 0)
        self.timer = StepTimer(self.acc.device)
        self.tokens, self.model_flops, self.data_sum, self.train_time, self.preempted = 0, 0.0, 0, 0.0, False
        self.peak, self.peak_source = None, None
        self.model = self.optimizer = self.scheduler = None
        self.facts: dict = {}  # what the recipe wants in this loop's summary besides the loop's own figures

    # ------------------------------------------------------------------ the accelerate path
    def run(self, model, optimizer, scheduler, train_dl, eval_dl, compute_loss, probe=None):
        """Train the prepared model; returns (model, optimizer, scheduler), rebuilt if freezing rebuilt them."""
        acc, args = self.acc, self.args
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.resume()
        per_epoch = (len(train_dl) // args.gradient_accumulation_steps) * args.gradient_accumulation_steps
        if per_epoch == 0:
            raise ConfigError(
                self.session.where,
                "per_device_train_batch_size",
                "one epoch has fewer micro-batches than gradient_accumulation_steps",
                "use more data or smaller batches",
            )
        batches = self._micro_batches(train_dl)
        data_ranks = tensor.data_parallel_size(acc)  # the ranks of a tensor-parallel group share one batch
        wrapper = [None]  # the DeepSpeed engine wrapper whose engine.step() is timed (a rebuild replaces it)

        def step_fn():
            micro = []
            while True:
                if getattr(acc, "deepspeed_engine_wrapped", None) is not wrapper[0]:
                    wrapper[0] = acc.deepspeed_engine_wrapped
                    self.timer.wrap_engine_step(wrapper[0].engine)
                with self.timer.part("data"):
                    batch = next(batches)
                with acc.accumulate(self.model), probe.first_micro_batch() if probe else contextlib.nullcontext():
                    with self.timer.part("forward"):
                        loss, logs = compute_loss(self.model, batch)
                    with self.timer.part("backward"):
                        acc.backward(loss)
                    with self.timer.part("optimizer"):
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                micro.append((loss.detach().float(), logs))
                self.data_sum += int(batch["input_ids"].sum())  # fingerprint of this rank's data order
                self.batch_in_epoch += 1
                self.count_tokens(batch["input_ids"].numel() * data_ranks, batch["input_ids"].shape[-1])
                if acc.sync_gradients:
                    with self.timer.part("optimizer"):
                        self.scheduler.step()
                    return self._reduce(micro)

        def on_step_end():
            if self.freezer is not None:  # rebuilds model/optimizer/scheduler when it froze something
                self.model, self.optimizer, self.scheduler = self.freezer.after_step(
                    self.step, self.model, self.optimizer, self.scheduler
                )
            if self.batch_in_epoch == per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0

        evaluate = (lambda: _evaluate(self.model, eval_dl, acc, args.max_eval_batches)) if eval_dl is not None else None
        self.model.train()
        self.drive(step_fn, evaluate, on_step_end)
        return self.model, self.optimizer, self.scheduler

    def resume(self) -> None:
        """Load the checkpoint this phase resumes from (model, optimizer, schedule, RNG; call after prepare)."""
        if self.resumed_from and self.session.elastic is not None:
            self.facts["elastic_resume"] = self.session.elastic.load(self.acc)
        elif self.resumed_from:
            self.session.ckpt.load(self.resumed_from)
            where = f" ({self.phase})" if self.phase else ""
            self.session.print(f"resumed from {self.resumed_from} at step {self.step}{where}")

    def _reduce(self, micro) -> tuple[float, dict]:
        """The step's loss and each logged term: the mean over its micro-batches, then over the ranks."""
        names = sorted(k for k in micro[0][1] if k != "loss")
        means = [sum(m[1][k] for m in micro) / len(micro) for k in names]
        with self.timer.part("communication"):
            loss = torch.stack([m[0] for m in micro]).mean().reshape(1)
            vals = _mean_across(self.acc, torch.cat([loss, torch.tensor(means, dtype=loss.dtype, device=loss.device)]))
        return vals[0], dict(zip(names, vals[1:]))

    def _micro_batches(self, train_dl):
        """Micro-batches from the saved position on: set_epoch re-shuffles each epoch, skip_first_batches skips what
        a resumed epoch had already seen; a new iterator starts once the loop rolled the epoch over."""
        while True:
            train_dl.set_epoch(self.epoch)
            skip = getattr(train_dl, "skip_first", None) or (lambda n: self.acc.skip_first_batches(train_dl, n))
            part = skip(self.batch_in_epoch) if self.batch_in_epoch else train_dl  # skip_first: SP's sharded loader
            for batch in part:
                yield batch
                if self.batch_in_epoch == 0:
                    break  # epoch finished: the next one re-shuffles

    def count_tokens(self, tokens: int, seq_len: int) -> None:
        self.tokens += tokens
        if self.flops is not None:
            self.model_flops += tokens * self.flops.per_token(seq_len)

    # ------------------------------------------------------------------ the engine-neutral part
    def drive(self, step_fn, evaluate=None, on_step_end=None, log_fields=None) -> bool:
        """Run step_fn (one optimizer step; returns (loss, {term: value}), both already the same on every rank) until
        max_steps or a stop signal; log (plus log_fields() at each logged step), evaluate (evaluate() -> loss),
        call on_step_end(), check for a stop signal and checkpoint after each step. Returns True when preempted."""
        acc, args, log = self.acc, self.args, self.session.log
        tag = self.phase or "train"
        acc.wait_for_everyone()  # the ranks measure their peak together, as they will train
        self.peak, self.peak_source = peak_flops(acc.device)
        self.peak = _mean_across(acc, torch.tensor([self.peak or 0.0], dtype=torch.float64))[0] or None
        bar = tqdm(
            total=args.max_steps,
            initial=self.step,
            desc=tag,
            disable=not getattr(acc, "is_local_main_process", acc.is_main_process),
        )
        t_loop = time.time()
        while self.step < args.max_steps and not self.preempted:
            self.train_loss, terms = step_fn()
            self.step += 1
            bar.update(1)
            self.first_loss = self.train_loss if self.first_loss is None else self.first_loss
            for k, v in {**terms, "loss": self.train_loss}.items():
                self.window_sums[k] = self.window_sums.get(k, 0.0) + v
            self.window_steps += 1
            if self.step % args.logging_steps == 0 or self.step == args.max_steps:
                elapsed = max(time.time() - t_loop, 1e-9)
                # float(): torchao's low-bit AdamW keeps lr as a tensor, which json cannot write
                lr = float(self._lr())
                means = {k: v / self.window_steps for k, v in self.window_sums.items()}
                self.window_sums, self.window_steps = {}, 0
                loss = means.pop("loss")
                rec = {"step": self.step, "loss": loss, "step_loss": self.train_loss, "lr": lr, "epoch": self.epoch}
                rec.update(tokens_per_s=self.tokens / elapsed, data_sum=self._global_data_sum(), **means)
                rec.update(log_fields() if log_fields is not None else {})
                log.write(rec if self.phase is None else {**rec, "phase": self.phase})
                self.data_sum = 0
                self.session.track({f"{tag}/loss": loss, f"{tag}/lr": lr}, self.offset + self.step)
                now = mfu(self.tokens / elapsed, self.model_flops / max(self.tokens, 1), self.peak, acc.num_processes)
                bar.set_postfix(loss=f"{loss:.3f}", **({"mfu": f"{now:.2%}"} if now else {}))
            if evaluate is not None and (self.step % args.eval_steps == 0 or self.step == args.max_steps):
                self.eval_loss = evaluate()
                rec = {"step": self.step, "eval_loss": self.eval_loss, "eval_ppl": perplexity(self.eval_loss)}
                log.write(rec if self.phase is None else {**rec, "phase": self.phase})
                ppl, name = perplexity(self.eval_loss), "eval" if self.phase is None else f"{self.phase}_eval"
                self.session.track({f"{name}/loss": self.eval_loss, f"{name}/ppl": ppl}, self.offset + self.step)
            if on_step_end is not None:
                on_step_end()
            with self.timer.part("communication"):
                self.preempted = self.session.stop.requested(acc)
            done = self.step >= args.max_steps
            if (args.save_steps and self.step % args.save_steps == 0) or done or self.preempted:
                self.save()
        bar.close()
        self.train_time = time.time() - t_loop
        return self.preempted

    def _global_data_sum(self) -> int:
        """The sum of the token ids every rank trained on since the last log: a fingerprint of which samples the
        steps saw, independent of how they were split over ranks and micro-batches (an elastic resume keeps it).
        The ranks of a tensor-parallel group share a batch: they must agree and count once (parallel.tensor)."""
        return tensor.data_sum(self.acc, self.data_sum)

    def _lr(self):
        return self.scheduler.get_last_lr()[0]

    def trainer_state(self) -> dict:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "first_loss": self.first_loss,
            "last_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "loss_window": {"sums": self.window_sums, "steps": self.window_steps},
            "freezer": self.freezer.state() if self.freezer is not None else {},
            "log_lines": self.session.log.lines,
            "world": elastic.world_facts(self.acc, self.args),  # what an elastic resume needs to know
        }
        if self.phase is not None:
            state["phase"] = self.phase
        return {**self.extra_state, **state}

    def save(self) -> str:
        model = (
            self.acc.unwrap_model(self.model) if self.model is not None and hasattr(self.acc, "unwrap_model") else None
        )
        config = getattr(model, "config", None)
        return self.session.ckpt.save(self.offset + self.step, self.trainer_state(), model_config=config)

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        """The loop's part of summary.json: status, losses, time, throughput, MFU and the step-time breakdown."""
        tokens_per_s = self.tokens / max(self.train_time, 1e-9)
        per_token = self.model_flops / self.tokens if self.tokens and self.flops is not None else None
        out = {
            "status": "preempted" if self.preempted else "completed",
            "steps": self.step,
            "first_loss": self.first_loss,
            "final_loss": self.train_loss,
            "final_eval_loss": self.eval_loss,
            "final_eval_ppl": perplexity(self.eval_loss) if self.eval_loss is not None else None,
            "train_time_s": self.train_time,
            "tokens": self.tokens,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": per_token,
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "mfu": mfu(tokens_per_s, per_token or 0.0, self.peak, self.acc.num_processes),
            "step_time_breakdown": self.timer.breakdown(self.train_time),
            "resumed_from": self.resumed_from,
        }
        if self.freezer is not None:
            out.update(frozen_params=self.freezer.frozen_params, freezing=self.freezer.report())
        return {**out, **self.facts}


def _evaluate(model, eval_dl, acc, max_batches):
    from dsrecipes.train.accelerator import evaluate_lm

    return evaluate_lm(model, eval_dl, acc, max_batches)
