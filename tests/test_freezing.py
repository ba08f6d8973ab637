"""Layer freezing: schedules, the adaptive test, the frozen-prefix cache (same loss and gradients as without it)
and the refusals. The recipe runs that freeze under DeepSpeed are in tests/test_freezing_recipes.py.

Run: .venv/bin/python -m pytest tests/test_freezing.py -q      (fast tests in seconds; -m slow: about 2 minutes)
"""

import os
import types

import pytest
import torch

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
