"""Memory benchmark (book ch. 4): activation checkpointing, 8-bit optimizers and ZeRO 0-3 side by side on CPU, each
row measured and compared with `dsrecipes plan`'s prediction, in one run on this machine.

Run:  make bench-memory      (= .venv/bin/python benchmarks/bench_memory.py; BENCH_QUICK=1 for a smoke run)
Produces: docs/results/memory.{md,json,png} (machine, versions, rows, targets) via dsrecipes.results; work files
(model config, runs, logs) under outputs/bench_memory/.

What runs:
1. checkpointing (in this process, GPT-2 12x256, micro-batch 2 x 1024 tokens, fp32, AdamW): none, HF full
   (non-reentrant and reentrant), every_k for k = 2, 3 (= round(sqrt 12)), 4, 6, layer_selective for k = 2, 3, 4,
   6 (fractions 1/2 .. 1/6 of the blocks checkpointed), selective_ops (matmul/attention outputs kept), and
   DeepSpeed's checkpoint (default section, and partition_activations + contiguous buffers). Per row: bytes saved
   for backward during the forward (saved-tensor hooks), the step's peak tensor bytes (torch's MemTracker, the CPU
   stand-in for max_memory_allocated) and the median step time (CPU time of this 1-thread process, modes
   interleaved, so other processes on the machine do not count).
2. optimizers (in this process, GPT-2 4x256 on the generated corpus, same batches): torch AdamW, bitsandbytes
   AdamW8bit, torchao AdamW8bit and AdamW4bit for the same steps; optimizer-state bytes read from the optimizer,
   optimizer-step time, final eval loss.
3. ZeRO 0/1/2/3 (+ 8-bit under ZeRO-2/3): recipes/train_lm.py through `accelerate launch`, 2 ranks x 1 thread,
   GPT-2 4x256, micro-batch 4 x 128; per-rank model states read from the engine's tensors at the second optimizer
   step (before ZeRO-1's gradient reduction, when the full gradients are still there, and before the step),
   against the ZeRO paper's per-device formula and the planner.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
from dsrecipes.launching import child_env, free_port, launch_cmd  # noqa: E402
from dsrecipes.memory import activation_checkpointing, measure, planner  # noqa: E402
from dsrecipes.results import target, write_results  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
WORK = os.path.join(ROOT, "outputs", "bench_memory")
MiB = 2**20
S = lambda full, quick: quick if QUICK else full
LAYERS, HIDDEN, HEADS, MICRO, SEQ = S(12, 4), 256, 4, 2, S(1024, 64)  # checkpointing rows
ZMICRO, ZSEQ = 4, S(128, 64)  # ZeRO rows (GPT-2 4x256)
REPS, OPT_STEPS, ZERO_STEPS = S(5, 2), S(25, 4), S(4, 3)


def model_config(path: str, layers: int) -> str:
    with open(path, "w") as fh:
        json.dump(
            {
                "_comment": f"GPT-2 {layers}x{HIDDEN} for benchmarks/bench_memory.py",
                "model_type": "gpt2",
                "n_layer": layers,
                "n_embd": HIDDEN,
                "n_head": HEADS,
                "n_positions": max(SEQ, 256),
                "resid_pdrop": 0.1,
                "embd_pdrop": 0.1,
                "attn_pdrop": 0.1,
                "tie_word_embeddings": True,
            },
            fh,
            indent=2,
        )
    return path


def build(path: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_model_config(path, byte_tokenizer()))
    model.train()
    return model


def single_rank_group() -> None:
    """deepspeed.checkpointing.configure needs DeepSpeed's communication set up: a world of one here."""
    import deepspeed

    port = str(free_port())
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def rel(a, b):
    return a / b - 1.0


# ============================================================================ 1. activation checkpointing
def checkpointing_rows(path: str, spec) -> list[dict]:
    from torch.distributed._tools.mem_tracker import MemTracker

    single_rank_group()
    k_sqrt = activation_checkpointing.default_every_k(LAYERS)
    part = {"partition_activations": True, "contiguous_memory_optimization": True, "number_checkpoints": LAYERS}
    variants = [
        ("none", "none", {}, None),
        ("full", "full", {}, None),
        ("full reentrant", "full", {"gradient_checkpointing_reentrant": True}, None),
    ]
    for k in sorted(k for k in {2, k_sqrt, 4, 6} if k <= LAYERS):
        variants.append(
            (f"every_k k={k}" + (" (sqrt n)" if k == k_sqrt else ""), "every_k", {"checkpoint_every_k": k}, None)
        )
    for k in sorted(k for k in {2, 3, 4, 6} if k <= LAYERS):
        variants.append((f"layer_selective k={k}", "layer_selective", {"checkpoint_every_k": k}, None))
    variants += [
        ("selective_ops", "selective_ops", {}, None),
        ("deepspeed", "deepspeed", {}, {"activation_checkpointing": {}}),
        ("deepspeed partition+contiguous", "deepspeed", {}, {"activation_checkpointing": part}),
    ]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 257, (MICRO, SEQ), generator=gen)
    runs = []
    for name, mode, extra, ds in variants:
        args = types.SimpleNamespace(
            **{
                "gradient_checkpointing": mode,
                "gradient_checkpointing_reentrant": False,
                "checkpoint_every_k": 0,
                "per_device_train_batch_size": MICRO,
                "gradient_accumulation_steps": 1,
                **extra,
            }
        )
        model = build(path)
        info = activation_checkpointing.apply_activation_checkpointing(model, args, None, ds)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step(model, opt, ids)  # warm-up: Adam state exists from here on
        with measure.SavedActivations(model) as acts:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            step(model, opt, ids)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        cat = {str(getattr(k, "value", k)): v for k, v in peak.items()}
        states = cat.get("Parameter", 0) + cat.get("Gradient", 0) + cat.get("Optstate", 0) + cat.get("Buffer", 0)
        k = info.get("every_k")
        plan = planner.plan_memory(  # the planner does not model selective_ops' per-op policy: no prediction
            spec,
            zero_stage=0,
            micro_batch=MICRO,
            seq_len=SEQ,
            precision="fp32",
            checkpointing=mode if mode in planner.CHECKPOINTING else "none",
            every_k=k,
            optimizer="adamw",
            device="cpu",
        )
        if mode not in planner.CHECKPOINTING:
            plan = {"detail": {"activations_saved_forward": float("nan")}, "activations": float("nan"), "total": None}
        runs.append(
            {
                "model": model,
                "opt": opt,
                "times": [],
                "row": {
                    "section": "checkpointing",
                    "technique": name,
                    "mode": mode,
                    "every_k": k,
                    # the blocks recomputed in backward (every_k recomputes every block, in segments)
                    "fraction_checkpointed": 1.0 if mode == "every_k" else info.get("checkpointed_blocks", 0) / LAYERS,
                    "act_saved_fwd_mib": acts.bytes / MiB,
                    "act_peak_mib": (cat["Total"] - states) / MiB,
                    "measured_total_mib": cat["Total"] / MiB,
                    "planner_saved_fwd_mib": plan["detail"]["activations_saved_forward"] / MiB,
                    "planner_activations_mib": plan["activations"] / MiB,
                    "planner_total_mib": plan["total"] / MiB if plan["total"] is not None else None,
                    "deepspeed_state": info.get("deepspeed"),
                },
            }
        )
        print(f"  {name}: saved {acts.bytes / MiB:.1f} MiB, peak {cat['Total'] / MiB:.1f} MiB", flush=True)
    for _ in range(REPS):  # interleaved; CPU time of this one-thread process, so busy neighbours do not count
        for r in runs:
            t0 = time.process_time()
            step(r["model"], r["opt"], ids)
            r["times"].append(time.process_time() - t0)
    base = statistics.median(runs[0]["times"])
    rows = []
    for r in runs:
        row = r["row"]
        row["step_s"] = statistics.median(r["times"])
        row["time_x"] = row["step_s"] / base
        row["act_saved_reduction_x"] = runs[0]["row"]["act_saved_fwd_mib"] / row["act_saved_fwd_mib"]
        row["act_peak_reduction_x"] = runs[0]["row"]["act_peak_mib"] / row["act_peak_mib"]
        if row["planner_total_mib"] is not None:
            row["planner_vs_measured"] = rel(row["planner_total_mib"], row["measured_total_mib"])
        rows.append(row)
    return rows


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


# ============================================================================ 2. 8-bit optimizers
def optimizer_rows(path: str, spec) -> list[dict]:
    from dsrecipes.config.args import DataArguments
    from dsrecipes.train.data import build_lm_datasets, byte_tokenizer
    from dsrecipes.train.optimizers import build_optimizer

    data_args = DataArguments(block_size=128, generated_docs=S(600, 60), eval_docs=40)
    train, evl, _ = build_lm_datasets(data_args, byte_tokenizer())
    batches = [train[i * 8 : (i + 1) * 8]["input_ids"] for i in range(OPT_STEPS)]
    eval_batches = [evl[i * 8 : (i + 1) * 8]["input_ids"] for i in range(min(4, len(evl) // 8))]
    rows = []
    for name in ("adamw", "adamw_8bit", "torchao_adamw_8bit", "torchao_adamw_4bit"):
        model = build(path, seed=0)
        args = types.SimpleNamespace(
            optimizer=name, learning_rate=2e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8
        )
        opt = build_optimizer(model, args)
        torch.manual_seed(1)
        step_times = []
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            t0 = time.process_time()
            opt.step()
            step_times.append(time.process_time() - t0)
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            eval_loss = statistics.fmean(model(input_ids=b, labels=b).loss.item() for b in eval_batches)
        states = measure.model_state_bytes(model, opt)
        dtypes = sorted({str(t.dtype) for st in opt.state.values() for v in st.values() for t in _inner(v)})
        plan = planner.plan_memory(spec, micro_batch=8, seq_len=128, precision="fp32", optimizer=name, device="cpu")
        rows.append(
            {
                "section": "optimizer",
                "technique": name,
                "optimizer_state_mib": states["optimizer_states"] / MiB,
                "state_dtypes": ",".join(dtypes),
                "opt_step_ms": 1000 * statistics.median(step_times[1:]),
                "final_eval_loss": eval_loss,
                "planner_optimizer_states_mib": plan["optimizer_states"] / MiB,
                "planner_vs_measured": rel(plan["optimizer_states"], states["optimizer_states"]),
            }
        )
        print(
            f"  {name}: state {states['optimizer_states'] / MiB:.2f} MiB, step {rows[-1]['opt_step_ms']:.0f} ms, "
            f"eval loss {eval_loss:.4f}",
            flush=True,
        )
    base = rows[0]
    for r in rows:
        r["state_x"] = r["optimizer_state_mib"] / base["optimizer_state_mib"]
        r["step_time_x"] = r["opt_step_ms"] / base["opt_step_ms"]
        r["loss_rel"] = rel(r["final_eval_loss"], base["final_eval_loss"])
    return rows


def _inner(t):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not isinstance(t, torch.Tensor):
        return []
    if is_traceable_wrapper_subclass(t):
        return [x for n in t.__tensor_flatten__()[0] for x in _inner(getattr(t, n))]
    return [t]


# ============================================================================ 3. ZeRO 0-3, 2 ranks
def zero_formula(psi: int, stage: int, n: int) -> float:
    """ZeRO paper per-device model states, fp32 training as DeepSpeed runs it: 4-byte params and grads, K = 12 (an
    fp32 master copy + Adam's two states) once the optimizer is partitioned (ZeRO >= 1), K = 8 without ZeRO."""
    k = 12 if stage >= 1 else 8
    return 4 * psi / (n if stage == 3 else 1) + 4 * psi / (n if stage >= 2 else 1) + k * psi / (n if stage >= 1 else 1)


def zero_rows(path: str, spec) -> list[dict]:
    rows = []
    runs = [(f"ZeRO-{s}", f"configs/deepspeed/zero{s}.json", "adamw") for s in (0, 1, 2, 3)]
    runs += [
        ("ZeRO-2 adamw_8bit", "configs/deepspeed/zero2.json", "adamw_8bit"),
        ("ZeRO-3 adamw_8bit", "configs/deepspeed/zero3.json", "adamw_8bit"),
    ]
    for name, ds, opt in runs:
        out = os.path.join(WORK, name.replace(" ", "_"))
        shutil.rmtree(out, ignore_errors=True)
        cmd = launch_cmd(
            "recipes/train_lm.py",
            [
                "--config",
                "configs/recipes/train_tiny_zero2.yaml",
                "--model_config",
                path,
                "--optimizer",
                opt,
                "--max_steps",
                str(ZERO_STEPS),
                "--block_size",
                str(ZSEQ),
                "--per_device_train_batch_size",
                str(ZMICRO),
                "--generated_docs",
                "200",
                "--eval_docs",
                "20",
                "--logging_steps",
                "1",
                "--eval_steps",
                "100000",
                "--max_eval_batches",
                "1",
                "--save_steps",
                "0",
                "--export_final",
                "false",
                "--report_to",
                "none",
                "--warmup_steps",
                "1",
                "--output_dir",
                out,
            ],
            deepspeed=ds,
            num_processes=2,
        )
        env = child_env()
        t0 = time.time()
        with open(out + ".log", "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"{name} failed (exit {rc}); see {out}.log")
        with open(os.path.join(out, "summary.json")) as fh:
            summ = json.load(fh)
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            recs = [json.loads(line) for line in fh if '"tokens_per_s"' in line]
        # elapsed since the loop began = tokens so far / tokens_per_s; the first step (warm-up) is left out
        elapsed = [r["step"] * ZMICRO * ZSEQ * 2 / r["tokens_per_s"] for r in recs]
        step_s = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
        m = summ["memory"]
        at = m["at_step"]
        psi = summ["params"]
        stage = summ["zero_stage"]
        states = at["parameters"] + at["gradients"] + at["optimizer_states"]
        measured_total = states + at["buffers"] + m["activation_bytes_per_micro_batch"]
        plan = (
            planner.plan_memory(
                spec,
                zero_stage=stage,
                gpus_per_node=2,
                micro_batch=ZMICRO,
                seq_len=ZSEQ,
                precision="fp32",
                optimizer=opt,
                device="cpu",
            )
            if not (stage == 3 and opt != "adamw")
            else None
        )
        row = {
            "section": "zero",
            "technique": name,
            "zero_stage": stage,
            "optimizer": opt,
            "params": psi,
            "params_mib": at["parameters"] / MiB,
            "grads_mib": at["gradients"] / MiB,
            "optimizer_states_mib": at["optimizer_states"] / MiB,
            "model_states_mib": states / MiB,
            "buffers_mib": at["buffers"] / MiB,
            "act_saved_fwd_mib": m["activation_bytes_per_micro_batch"] / MiB,
            "measured_total_mib": measured_total / MiB,
            "peak_rss_mb": m["peak_rss_mb"],
            "wall_step_s": step_s,
            "final_loss": summ["final_loss"],
        }
        if opt == "adamw":
            row["formula_model_states_mib"] = zero_formula(psi, stage, 2) / MiB
            row["formula_dev"] = rel(states, zero_formula(psi, stage, 2))
        if plan is not None:
            row["planner_model_states_mib"] = (plan["parameters"] + plan["gradients"] + plan["optimizer_states"]) / MiB
            row["planner_total_mib"] = plan["total"] / MiB
            row["planner_vs_measured"] = rel(plan["total"], measured_total)
        rows.append(row)
        print(f"  {name}: model states {states / MiB:.1f} MiB/rank, {time.time() - t0:.0f} s", flush=True)
    return rows


# ============================================================================ targets, plot, write
def main() -> int:
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(1)  # one rank's share of the 2 cores; timings are this process's CPU time
    t_start = time.time()
    big = model_config(os.path.join(WORK, f"gpt2_{LAYERS}x{HIDDEN}.json"), LAYERS)
    small = model_config(os.path.join(WORK, f"gpt2_4x{HIDDEN}.json"), 4)
    spec_big, spec_small = planner.load_model_spec(big, vocab=257), planner.load_model_spec(small, vocab=257)
    print("1. activation checkpointing", flush=True)
    ck = checkpointing_rows(big, spec_big)
    print("2. optimizers", flush=True)
    op = optimizer_rows(small, spec_small)
    print("3. ZeRO stages (2 ranks)", flush=True)
    zr = zero_rows(small, spec_small)
    rows = ck + op + zr

    by = {r["technique"]: r for r in rows}
    k_sqrt = activation_checkpointing.default_every_k(LAYERS)
    full, sel = by["full"], next(r for r in ck if r["every_k"] == k_sqrt)
    bnb = by["adamw_8bit"]
    targets = [
        target(
            f"full checkpointing: activation bytes saved for backward, none / full ({LAYERS} layers)",
            round(full["act_saved_reduction_x"], 2),
            ">= 8x",
            full["act_saved_reduction_x"] >= 8,
        ),
        target("full checkpointing: step time vs none", round(full["time_x"], 3), "<= 1.35x", full["time_x"] <= 1.35),
        target(
            f"selective (every_k, k={k_sqrt}): activation bytes saved for backward, none / every_k",
            round(sel["act_saved_reduction_x"], 2),
            ">= 3x",
            sel["act_saved_reduction_x"] >= 3,
        ),
        target(  # kept with its number, never met: every_k recomputes every block, so it costs what full costs
            f"selective (every_k, k={k_sqrt}): step time vs none [retired: every_k recomputes every block]",
            round(sel["time_x"], 3),
            "retired (was <= 1.10x)",
            False,
        ),
        target(
            "bitsandbytes AdamW8bit state / fp32 AdamW state",
            round(bnb["state_x"], 4),
            "<= 0.26x",
            bnb["state_x"] <= 0.26,
        ),
        target(
            f"bitsandbytes AdamW8bit final eval loss vs fp32 AdamW ({OPT_STEPS} steps)",
            round(bnb["loss_rel"], 4),
            "within 1%",
            abs(bnb["loss_rel"]) <= 0.01,
        ),
    ]
    for r in (r for r in ck if r["mode"] == "layer_selective"):  # overhead ~ fraction checkpointed x full's
        expect = 1 + r["fraction_checkpointed"] * (full["time_x"] - 1)
        targets.append(
            target(
                f"layer_selective k={r['every_k']}: step time / (1 + {r['fraction_checkpointed']:.3f} x full's "
                f"overhead {full['time_x'] - 1:.3f})",
                round(r["time_x"] / expect, 4),
                "within 5%",
                abs(r["time_x"] / expect - 1) <= 0.05,
            )
        )
    for r in zr:
        if r["optimizer"] == "adamw" and r["zero_stage"] in (1, 2, 3):
            targets.append(
                target(
                    f"ZeRO-{r['zero_stage']} per-rank model states vs formula (2 ranks)",
                    round(r["formula_dev"], 4),
                    "within 5%",
                    abs(r["formula_dev"]) <= 0.05,
                )
            )
    compared = [r for r in rows if "planner_vs_measured" in r]
    worst = max(compared, key=lambda r: abs(r["planner_vs_measured"]))
    targets.append(
        target(
            f"planner total vs measured, worst of {len(compared)} rows ({worst['technique']})",
            round(worst["planner_vs_measured"], 4),
            "within 10%",
            abs(worst["planner_vs_measured"]) <= 0.10,
        )
    )
    missed = [t for t in targets if not t["met"] and "[retired" not in t["name"]]
    notes = (
        f"One run, {time.time() - t_start:.0f} s. Activation rows: GPT-2 {LAYERS}x{HIDDEN} (dropout 0.1), micro-batch "
        f"{MICRO}x{SEQ}, fp32, one process with 1 thread; step_s and opt_step_ms are this process's CPU time "
        "(median of interleaved steps; wall time on a shared machine is noise); 'act_saved_fwd' = bytes autograd keeps "
        "for backward "
        "during the forward (saved-tensor hooks, once per storage, parameters excluded; DeepSpeed's checkpoint "
        "keeps its input outside autograd and is counted by dsrecipes.memory); 'measured_total' = peak tensor bytes "
        "of a whole training step (params, grads, Adam state, activations, temporaries; torch MemTracker); "
        "'act_peak' = that peak minus model states, so it includes the recompute of one block (full) or one "
        "segment (every_k) and the logits' temporaries. every_k keeps the input of every k-th block and recomputes "
        "each k-block segment in backward (Chen et al. 2016): every block is recomputed once, so it costs what full "
        "checkpointing costs; what k buys is memory (n/k kept inputs + k blocks recomputed at once), so its old time "
        "target is retired (kept in the table with its number). layer_selective checkpoints blocks 0, k, 2k, ... and "
        "keeps the others' activations: its overhead should be the checkpointed fraction of full's. selective_ops "
        "checkpoints every block but keeps matmul and attention outputs (torch selective checkpoint contexts): "
        "memory and time reported, no target, and no planner figure (the planner does not model per-op policies). "
        f"Optimizer rows: GPT-2 4x{HIDDEN}, {OPT_STEPS} steps of 8x128 tokens on the generated corpus, same batches; "
        "torchao quantizes only tensors of >= 4096 values that are a multiple of its block, so small tensors keep "
        f"fp32 state. ZeRO rows: recipes/train_lm.py, GPT-2 4x{HIDDEN}, micro-batch {ZMICRO}x{ZSEQ}, 2 ranks x 1 "
        "thread, states read at the second optimizer step (the larger of: before the gradient reduction, before "
        "the step); measured_total = model states + ZeRO buffers + activations saved for backward; formula = "
        "ZeRO paper with 4-byte params/grads and K = 12 (DeepSpeed clones an fp32 master partition, also in fp32 "
        "training) or 8 (ZeRO-0); their wall_step_s is wall time on a shared machine, indicative only. The "
        "planner refuses 8-bit optimizers under ZeRO-3, so that row has no prediction. "
        + (
            f"Missed: {', '.join(t['name'] + ' = ' + str(t['value']) for t in missed)}."
            if missed
            else "All targets met."
        )
    )
    columns = [
        "section",
        "technique",
        "fraction_checkpointed",
        "act_saved_fwd_mib",
        "act_peak_mib",
        "act_saved_reduction_x",
        "act_peak_reduction_x",
        "step_s",
        "time_x",
        "optimizer_state_mib",
        "state_x",
        "state_dtypes",
        "opt_step_ms",
        "step_time_x",
        "final_eval_loss",
        "loss_rel",
        "params_mib",
        "grads_mib",
        "optimizer_states_mib",
        "model_states_mib",
        "formula_model_states_mib",
        "formula_dev",
        "measured_total_mib",
        "planner_total_mib",
        "planner_optimizer_states_mib",
        "planner_vs_measured",
        "wall_step_s",
        "peak_rss_mb",
    ]
    write_results(
        "memory", rows, targets, plot=plot(ck, op, zr), columns=columns, notes=notes, command="make bench-memory"
    )
    for t in targets:
        print(f"  {'met ' if t['met'] else 'MISS'} {t['name']}: {t['value']} (goal {t['goal']})")
    print(f"wrote docs/results/memory.{{md,json,png}} in {time.time() - t_start:.0f} s")
    return 0


def plot(ck, op, zr):
    def draw(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        ax = axes[0]
        for i, r in enumerate(ck):
            color = {"every_k": "C1", "deepspeed": "C2", "layer_selective": "C3", "selective_ops": "C4"}.get(
                r["mode"], "C0"
            )
            ax.scatter(r["step_s"], r["measured_total_mib"], color=color)
            lift = 0 if r["mode"] in ("none", "every_k", "layer_selective") else 12 * (i % 4)  # full/deepspeed coincide
            ax.annotate(
                r["technique"],
                (r["step_s"], r["measured_total_mib"]),
                fontsize=7,
                xytext=(3, 3 + lift),
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "lw": 0.4} if lift else None,
            )
        ev = sorted((r for r in ck if r["mode"] == "every_k"), key=lambda r: r["every_k"])
        ax.plot([r["step_s"] for r in ev], [r["measured_total_mib"] for r in ev], color="C1", lw=0.8)
        ls = sorted((r for r in ck if r["mode"] == "layer_selective"), key=lambda r: r["every_k"])
        ax.plot([r["step_s"] for r in ls], [r["measured_total_mib"] for r in ls], color="C3", lw=0.8)
        ax.set(
            xlabel="step CPU time (s, 1 thread)",
            ylabel="peak tensor memory of a step (MiB)",
            title=f"checkpointing, GPT-2 {LAYERS}x{HIDDEN}, {MICRO}x{SEQ} tokens",
        )
        ax = axes[1]
        for r in op:
            ax.scatter(r["opt_step_ms"], r["optimizer_state_mib"])
            ax.annotate(
                r["technique"],
                (r["opt_step_ms"], r["optimizer_state_mib"]),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set(
            xlabel="optimizer step CPU time (ms, 1 thread)",
            ylabel="optimizer state (MiB)",
            title=f"optimizers, GPT-2 4x{HIDDEN}",
        )
        ax = axes[2]
        for r in zr:
            ax.scatter(r["wall_step_s"], r["model_states_mib"])
            ax.annotate(
                r["technique"],
                (r["wall_step_s"], r["model_states_mib"]),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set(
            xlabel="wall step time (s, 2 ranks, shared machine)",
            ylabel="model states per rank (MiB)",
            title="ZeRO stages, 2 ranks",
        )
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    return draw


if __name__ == "__main__":
    sys.exit(main())
