"""Layer freezing: schedules, the adaptive test, the frozen-prefix cache (same loss and gradients as without it),
and recipes/train_lm.py runs that freeze under DeepSpeed (ZeRO 0/2, 1 and 2 processes, rebuilt engines).

Run: .venv/bin/python -m pytest tests/test_freezing.py -q      (fast tests in seconds; -m slow: about 2 minutes)
"""

import os
import types

import pytest
import torch

from conftest import launch_cmd, read_jsonl, run, summary, train_curve

NODROP = "configs/models/tiny_gpt2_nodropout.json"


def tiny_model(path=NODROP, seed=0):
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(load_model_config(path, byte_tokenizer()))


def freeze_prefix(model, depth):
    from dsrecipes.freezing.freezer import embedding_modules
    from dsrecipes.train.models import transformer_blocks

    for m in embedding_modules(model) + list(transformer_blocks(model)[:depth]):
        m.requires_grad_(False)


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- schedules and the adaptive test
def test_freezeout_schedules():
    from dsrecipes.freezing.freezer import schedule_steps

    assert schedule_steps("linear", 4, 100, 0.2, 0.6) == [20, 33, 47, 60]
    cubic = schedule_steps("cubic", 4, 100, 0.2, 0.6)
    assert cubic[0] == 20 and cubic[-1] == 60 and cubic == sorted(cubic)
    assert all(c < lin for c, lin in zip(cubic[1:-1], [33, 47]))  # front blocks freeze earlier than linear


def test_adaptive_monitor_freezes_only_blocks_whose_grad_norm_settled():
    from dsrecipes.freezing.freezer import GradNormMonitor

    steady, noisy = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    mon = GradNormMonitor([steady, noisy], check_steps=2, threshold=0.1, window=2)
    acc = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    for step in range(1, 13):
        scale = 1.0 if ((step - 1) // 2) % 2 else 3.0  # the noisy block's gradient jumps x3 every interval
        (steady.weight.sum() + scale * noisy.weight.sum()).backward()
        streak = mon.update(step, acc)
    assert streak[0] >= 2 and streak[1] == 0, mon.history
    assert len(mon.history) == 6 and mon.history[-1]["grad_norms"][0] == pytest.approx(3.0, rel=1e-5)
    mon.close()


def test_adaptive_monitor_resumed_mid_interval_averages_the_steps_it_saw():
    from dsrecipes.freezing.freezer import GradNormMonitor

    lin = torch.nn.Linear(3, 3)
    acc = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    mon = GradNormMonitor([lin], check_steps=4, threshold=0.1, window=1)
    for step in range(1, 7):  # one full interval (steps 1-4), then a checkpoint at step 6, mid-interval
        lin.weight.sum().backward()
        mon.update(step, acc)
    mon.close()
    resumed = GradNormMonitor([lin], check_steps=4, threshold=0.1, window=1, state=mon.state())
    for step in (7, 8):  # the resumed run sees only 2 of the interval's 4 steps
        lin.weight.sum().backward()
        streak = resumed.update(step, acc)
    assert resumed.history[-1]["grad_norms"][0] == pytest.approx(3.0, rel=1e-5)  # per-step norm, not 3/sqrt(2)
    assert streak == [1]  # the same norm as the interval before the checkpoint: no spurious change
    resumed.close()


def fake_accelerator():
    return types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=None),
        num_processes=1,
        process_index=0,
        device=torch.device("cpu"),
        mixed_precision="no",
        print=print,
    )


def default_args(**over):
    import dataclasses

    from dsrecipes.config.args import DataArguments, ModelArguments, TrainArguments

    vals = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for dc in (ModelArguments, DataArguments, TrainArguments)
        for f in dataclasses.fields(dc)
    }
    return types.SimpleNamespace(**{**vals, **over})


def test_progressive_count_starts_after_the_leading_frozen_units_only():
    from dsrecipes.freezing.freezer import Freezer
    from dsrecipes.train.models import transformer_blocks

    model = tiny_model()
    # a pattern freezes block 2 statically; embeddings + block 0 (unit 0) and block 1 (unit 1) still train
    args = default_args(freeze_schedule="linear", max_steps=10, freeze_patterns=[r"^transformer\.h\.2\."])
    fz = Freezer(model, args, fake_accelerator())
    assert not any(p.requires_grad for p in transformer_blocks(model)[2].parameters())
    assert fz.n_frozen == 0 and fz.state() == {"frozen_units": 0}  # the old count said 1: unit 0 would never freeze
    assert fz._target(fz.steps[0]) == 1


# ---------------------------------------------------------------------------- the frozen-prefix cache
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_prefix_cache_gives_the_same_loss_and_grads_and_skips_the_prefix(tmp_path, mode):
    from dsrecipes.freezing.prefix_cache import PrefixCache
    from dsrecipes.train.models import transformer_blocks

    model = tiny_model().train()
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))
    freeze_prefix(model, 2)
    ref_loss, ref_grads = loss_and_grads(model, ids)
    calls = []
    blk0 = transformer_blocks(model)[0]
    blk0.attn.register_forward_hook(lambda *a: calls.append(1))
    cache = PrefixCache(model, mode, max_mb=64, cache_dir=str(tmp_path / "c") if mode == "disk" else None)
    cache.activate(2)
    for expect_hits in (0, 4):  # first pass computes and stores the prefix, second reuses it
        n_calls = len(calls)
        loss, grads = loss_and_grads(model, ids)
        assert cache.hits == expect_hits
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        assert grads.keys() == ref_grads.keys()
        assert all(torch.allclose(grads[k], ref_grads[k], atol=1e-6) for k in grads)
    assert len(calls) == n_calls  # block 0 did not run on the hit
    # The prefix grows: entries at depth 2 are extended through block 2, mixed-depth batches are handled.
    freeze_prefix(model, 3)
    cache.activate(3)
    ref3 = tiny_copy_loss(model, ids)
    assert loss_and_grads(model, ids)[0] == pytest.approx(ref3, abs=1e-6)  # extends 2 -> 3 and stores
    mixed = torch.cat([ids[:2], torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(2))])
    loss_and_grads(model, mixed)  # new rows stored at depth 3
    hits = cache.hits
    assert loss_and_grads(model, mixed)[0] == pytest.approx(tiny_copy_loss(model, mixed), abs=1e-6)
    assert cache.hits == hits + 4
    model.eval()
    before = cache.stats()
    model(input_ids=ids)  # eval forwards bypass the cache
    assert cache.stats() == before
    if mode == "disk":
        assert len([f for f in os.listdir(tmp_path / "c") if f.endswith(".pt")]) == cache.stats()["entries"]
    cache.close()


@pytest.mark.parametrize("reentrant", [True, False])
def test_prefix_cache_under_hf_checkpointing_keeps_the_gradients(reentrant):
    from dsrecipes.freezing.prefix_cache import PrefixCache

    model = tiny_model().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))
    freeze_prefix(model, 2)
    ref_loss, ref_grads = loss_and_grads(model, ids)
    assert "transformer.h.2.attn.c_attn.weight" in ref_grads
    cache = PrefixCache(model, "memory", checkpointing="full", reentrant=reentrant)
    cache.activate(2)
    for expect_hits in (0, 4):
        loss, grads = loss_and_grads(model, ids)
        assert cache.hits == expect_hits and loss == pytest.approx(ref_loss, abs=1e-6)
        assert grads.keys() == ref_grads.keys()  # on a hit too: the first trainable block still gets its gradients
        assert all(torch.allclose(grads[k], ref_grads[k], atol=1e-6) for k in grads)
    cache.close()


def test_prefix_cache_turns_off_under_every_k_checkpointing():
    from dsrecipes.freezing.prefix_cache import PrefixCache
    from dsrecipes.memory.activation_checkpointing import apply_activation_checkpointing

    model = tiny_model().train()
    apply_activation_checkpointing(model, default_args(gradient_checkpointing="every_k", checkpoint_every_k=2))
    messages = []
    cache = PrefixCache(model, "memory", checkpointing="every_k", log=messages.append)
    cache.activate(2)
    assert cache.depth == 0 and "every_k checkpointing" in cache.off_reason and messages
    cache.close()


def tiny_copy_loss(model, ids):
    """The loss of the same weights with no cache attached."""
    import copy

    clone = copy.deepcopy(model)
    for mod in clone.modules():
        mod._forward_pre_hooks.clear()
        mod._forward_hooks.clear()
    with torch.no_grad():
        return clone(input_ids=ids, labels=ids).loss.item()


def test_prefix_cache_turns_off_with_dropout_augmentation_and_respects_its_bound():
    from dsrecipes.freezing.prefix_cache import PrefixCache

    messages = []
    drop = tiny_model("configs/models/tiny_gpt2.json").train()
    freeze_prefix(drop, 1)
    cache = PrefixCache(drop, "memory", log=messages.append)
    cache.activate(1)
    assert cache.depth == 0 and "dropout is active in the frozen prefix" in cache.off_reason
    assert "transformer.drop (p=0.1)" in messages[0]

    model = tiny_model().train()
    freeze_prefix(model, 2)
    cache = PrefixCache(model, "memory", max_mb=1, log=messages.append)  # 128 rows of 16 x 128 floats
    cache.activate(2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(33):  # every input new, as with random crops: the cache fills up without a hit
            ids = torch.randint(0, 257, (4, 16), generator=gen)
            model(input_ids=ids, labels=ids)
    assert "no sample has come back" in cache.off_reason and cache.stats()["entries"] == 0

    small = PrefixCache(model, "memory", max_mb=0)
    small.activate(2)
    ids = torch.randint(0, 257, (4, 16), generator=gen)
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert small.stats()["entries"] == 0 and small.full == 4 and small.off_reason is None
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(loss, abs=1e-6)
    for c in (cache, small):
        c.close()


def test_progressive_freezing_is_refused_where_the_engine_cannot_be_rebuilt(tmp_path):
    import json

    from dsrecipes.config.check import lint_files

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    rec = tmp_path / "r.yaml"
    rec.write_text("freeze_schedule: linear\n")
    out = [e.line() for e in lint_files(deepspeed=str(ds), recipe=str(rec))]
    assert len(out) == 1 and "freeze_schedule: progressive freezing rebuilds the engine" in out[0], out
    rec.write_text("freeze_first_n_blocks: 2\n")
    assert lint_files(deepspeed=str(ds), recipe=str(rec)) == []  # static freezing is fine with ZeRO-3
    rec.write_text("freeze_schedule: linear\n")  # ZeRO-0 in bf16: DeepSpeed's own fp32 copies hold the Adam state
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    out = [e.line() for e in lint_files(deepspeed=str(ds), recipe=str(rec))]
    assert len(out) == 1 and "progressive freezing with ZeRO-0 and bf16" in out[0], out
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}))
    assert lint_files(deepspeed=str(ds), recipe=str(rec)) == []


def test_rebuild_refuses_zero0_with_mixed_precision_at_start():
    from dsrecipes.config.errors import ConfigError
    from dsrecipes.freezing.rebuild import check_rebuild_supported

    plugin = types.SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 0}, "bf16": {"enabled": "auto"}})
    acc = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), mixed_precision="bf16")
    with pytest.raises(ConfigError, match="ZeRO-0 and bf16 is not supported"):
        check_rebuild_supported(acc, default_args(freeze_schedule="linear"))
    acc.mixed_precision = "no"
    check_rebuild_supported(acc, default_args(freeze_schedule="linear"))


# ---------------------------------------------------------------------------- recipe runs under DeepSpeed
STEPS = 12
BASE = [
    "--config",
    "configs/recipes/freeze_tiny_progressive.yaml",
    "--max_steps",
    str(STEPS),
    "--logging_steps",
    "1",
    "--eval_steps",
    "100",
    "--save_steps",
    "6",
    "--report_to",
    "none",
    "--per_device_train_batch_size",
    "4",
    "--generated_docs",
    "12",
    "--eval_docs",
    "20",
    "--warmup_steps",
    "2",
    "--freeze_start",
    "0.2",
    "--freeze_end",
    "0.5",
]


def check_events(s, shards):
    fz = s["freezing"]
    ev = fz["events"]
    assert [e["step"] for e in ev] == fz["planned_steps"] == [2, 4, 6]
    before = [e["optimizer_params_before"] for e in ev]
    after = [e["optimizer_params_after"] for e in ev]
    assert all(a < b for a, b in zip(after, before)) and after[:-1] == before[1:]
    assert fz["frozen_weights_unchanged"] is True
    trainable = s["params"] - s["frozen_params"]
    # the optimizer holds exactly the trainable parameters (ZeRO 1/2: this rank's 1/world share of them)
    assert abs(after[-1] * shards - trainable) <= 64 * shards, (after[-1], trainable)
    return fz


@pytest.mark.slow
def test_progressive_freezing_zero2_with_cache_equals_zero0_two_processes(tmp_path):
    outs = {}
    for stage, extra in (("zero2", ["--freeze_cache", "memory"]), ("zero0", ["--freeze_cache", "none"])):
        outs[stage] = str(tmp_path / stage)
        run(
            launch_cmd(
                "recipes/train_lm.py",
                BASE + ["--output_dir", outs[stage], *extra],
                deepspeed=f"configs/deepspeed/{stage}.json",
            ),
            timeout=600,
        )
    z2, z0 = summary(outs["zero2"]), summary(outs["zero0"])
    fz = check_events(z2, shards=2)
    check_events(z0, shards=1)  # ZeRO-0: every rank holds the whole (trainable) optimizer
    assert fz["cache"]["hits"] > 0 and fz["cache"]["off_reason"] is None
    # ZeRO-2's rebuilt flat partitions (Adam state carried over fragment by fragment) and ZeRO-0's torch optimizer
    # (state handed over per parameter) give the same curve; the cache changes nothing either.
    c2, c0 = train_curve(outs["zero2"]), train_curve(outs["zero0"])
    assert [d for *_, d in c2] == [d for *_, d in c0]
    assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(c2, c0)), (c2, c0)
    assert os.path.isfile(os.path.join(outs["zero2"], "final", "model.safetensors"))
    # Resume from the step-6 checkpoint (3 units frozen there): the freezer re-freezes them before building the
    # optimizer, so the checkpoint's partitions fit and the rest of the curve is the same.
    resumed = str(tmp_path / "resumed")
    run(
        launch_cmd(
            "recipes/train_lm.py",
            BASE
            + [
                "--output_dir",
                resumed,
                "--freeze_cache",
                "memory",
                "--resume_from",
                os.path.join(outs["zero2"], "checkpoints", "step_00000006"),
            ],
            deepspeed="configs/deepspeed/zero2.json",
        )
    )
    assert train_curve(resumed)[-6:] == c2[-6:]


@pytest.mark.slow
def test_cubic_and_adaptive_one_process(tmp_path):
    cubic = str(tmp_path / "cubic")
    run(
        launch_cmd(
            "recipes/train_lm.py",
            BASE
            + [
                "--output_dir",
                cubic,
                "--freeze_schedule",
                "cubic",
                "--freeze_end",
                "0.9",
                "--freeze_cache",
                "disk",
                "--freeze_cache_dir",
                str(tmp_path / "cache"),
            ],
            deepspeed="configs/deepspeed/zero1.json",
            num_processes=1,
        )
    )
    fz = summary(cubic)["freezing"]
    assert fz["planned_steps"] == [2, 6, 11] and fz["frozen_weights_unchanged"] and fz["cache"]["hits"] > 0
    assert any(f.endswith(".pt") for f in os.listdir(tmp_path / "cache"))
    adaptive = str(tmp_path / "adaptive")  # no DeepSpeed: the plain torch optimizer is rebuilt
    run(
        launch_cmd(
            "recipes/train_lm.py",
            BASE
            + [
                "--output_dir",
                adaptive,
                "--freeze_schedule",
                "adaptive",
                "--freeze_check_steps",
                "1",
                "--freeze_threshold",
                "10",
                "--freeze_window",
                "1",
                "--freeze_start",
                "0.3",
                "--freeze_embeddings",
                "true",
                "--freeze_first_n_blocks",
                "1",
            ],
            accelerate_config="configs/accelerate/cpu_1proc.yaml",
        )
    )
    s = summary(adaptive)
    ev = s["freezing"]["events"]
    # static part: embeddings + block 0 frozen from the start, the tied head untied (its own 257 x 128 matrix)
    assert s["freezing"]["initial_frozen_params"] == 257 * 128 + 256 * 128 + 198272 and s["params"] == 891904
    # threshold 10 (any change counts as settled): after two measured intervals the other units qualify at once
    assert ev and ev[0]["step"] == 4 and ev[0]["frozen_units"] == 3 and s["freezing"]["frozen_weights_unchanged"]
    assert s["freezing"]["grad_norm_history"][0]["step"] == 1
    assert len(read_jsonl(os.path.join(adaptive, "metrics.jsonl"))) >= STEPS


@pytest.mark.slow
def test_static_freezing_zero3_two_processes_keeps_no_state_for_frozen_weights(tmp_path):
    """configs/recipes/freeze_tiny_static.yaml as shipped, under ZeRO-3 with 2 processes: the frozen embeddings and
    blocks 0-1 get no optimizer state (each rank holds fp32 master + Adam, 12 B, for its half of the trainable
    parameters only) and leave the run exactly as they came in, while the trained blocks move."""
    from safetensors.torch import load_file

    common = [
        "--config",
        "configs/recipes/freeze_tiny_static.yaml",
        "--logging_steps",
        "1",
        "--eval_steps",
        "100",
        "--save_steps",
        "0",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "4",
        "--generated_docs",
        "40",
        "--eval_docs",
        "20",
        "--warmup_steps",
        "1",
    ]
    outs = {}
    for steps in (1, 4):
        outs[steps] = str(tmp_path / f"steps{steps}")
        run(
            launch_cmd(
                "recipes/train_lm.py",
                common + ["--max_steps", str(steps), "--output_dir", outs[steps]],
                deepspeed="configs/deepspeed/zero3.json",
            )
        )
    s = summary(outs[4])
    assert s["zero_stage"] == 3 and s["world_size"] == 2 and s["status"] == "completed"
    trainable = s["params"] - s["frozen_params"]
    assert s["frozen_params"] == s["freezing"]["initial_frozen_params"] and 0 < trainable < s["params"]
    at = s["memory"]["at_step"]
    assert at["optimizer_states"] == pytest.approx(12 * trainable / 2, rel=0.02), (at, trainable)
    w1, w4 = (load_file(os.path.join(outs[k], "final", "model.safetensors")) for k in (1, 4))
    frozen = [
        k for k in w4 if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.", "transformer.h.1."))
    ]
    trained = [k for k in w4 if k.startswith(("transformer.h.2.", "transformer.h.3."))]
    assert frozen and trained
    assert all(torch.equal(w1[k], w4[k]) for k in frozen)
    assert all(not torch.equal(w1[k], w4[k]) for k in trained if k.endswith(".weight"))


@pytest.mark.slow
def test_freeze_tiny_adaptive_yaml_freezes_blocks_two_processes(tmp_path):
    """configs/recipes/freeze_tiny_adaptive.yaml through --config (its adaptive schedule, 10-step intervals, window 2,
    threshold 0.35, the prefix cache on disk), 2 processes under ZeRO-2, 100 of its 300 steps."""
    out = str(tmp_path / "adaptive")
    flags = ["--max_steps", "100", "--eval_steps", "100", "--save_steps", "0", "--report_to", "none"]
    flags += ["--export_final", "false", "--output_dir", out]
    run(launch_cmd("recipes/train_lm.py", ["--config", "configs/recipes/freeze_tiny_adaptive.yaml", *flags]))
    s = summary(out)
    fz = s["freezing"]
    assert s["status"] == "completed" and s["world_size"] == 2 and s["zero_stage"] == 2
    assert fz["schedule"] == "adaptive" and fz["initial_frozen_params"] == 0
    assert fz["final_frozen_params"] > 0 and s["frozen_params"] == fz["final_frozen_params"] < s["params"]
    assert fz["events"] and all(20 <= e["step"] < 100 for e in fz["events"])  # never before 20% of the run
    assert fz["events"][-1]["optimizer_params_after"] < fz["events"][0]["optimizer_params_before"]
    assert fz["frozen_weights_unchanged"] is True
    history = fz["grad_norm_history"]
    assert [h["step"] for h in history] == list(range(10, 101, 10))  # freeze_check_steps: 10
    assert fz["cache"]["off_reason"] is None and fz["cache"]["entries"] > 0  # the frozen prefix cached on disk
