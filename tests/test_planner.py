"""Memory planner (`dsrecipes plan`): ZeRO paper figures, exact parameter counts, activation bytes against what
HF GPT-2 really saves for backward (saved-tensor hooks), --fit ranking, DeepSpeed's estimator, one-line errors.

Run: .venv/bin/python -m pytest tests/test_planner.py -q        (fast; one CLI subprocess)
"""

import json
import os
import subprocess

import pytest
import torch

from conftest import BIN, ROOT, child_env
from dsrecipes import cli
from dsrecipes.memory.planner import (
    GPUS,
    ModelSpec,
    deepspeed_estimate,
    fit_search,
    fits,
    load_model_spec,
    plan_memory,
    spec_from_config,
    step_cost,
)

TINY = os.path.join(ROOT, "configs/models/tiny_gpt2.json")


def model_states(plan):
    return plan["parameters"] + plan["gradients"] + plan["optimizer_states"]


def test_zero_paper_worked_example():
    """Rajbhandari et al. 2020, Figure 1: 7.5B params, Nd = 64, K = 12 (mixed-precision Adam), GB = 1e9 bytes."""
    spec = ModelSpec("paper", int(7.5e9), layers=32, hidden=4096, heads=32, vocab=50257, ffn=16384)
    got = [
        round(model_states(plan_memory(spec, zero_stage=z, gpus_per_node=8, nodes=8, precision="bf16")) / 1e9, 1)
        for z in (0, 1, 2, 3)
    ]
    assert got == [120.0, 31.4, 16.6, 1.9]
    # fp32 (our CPU runs): 4 + 4 + 8 bytes, no master copy without ZeRO; frozen parameters carry only their weights.
    assert model_states(plan_memory(spec, precision="fp32", seq_len=8)) == int(7.5e9) * 16
    assert model_states(plan_memory(spec, precision="fp32", frozen_fraction=0.5, seq_len=8)) == int(7.5e9) * 10
    # under ZeRO >= 1 DeepSpeed clones the rank's fp32 partition for the optimizer: ZeRO-3 fp32 = 20 Psi / Nd
    assert model_states(plan_memory(spec, precision="fp32", zero_stage=3, gpus_per_node=8, seq_len=8)) == pytest.approx(
        7.5e9 * 20 / 8, rel=1e-9
    )


def test_exact_parameter_count_matches_the_built_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.models import count_parameters, load_model_config

    spec = load_model_spec(TINY, vocab=257)  # the byte tokenizer's vocabulary
    config = load_model_config(TINY)
    config.vocab_size = 257
    assert spec.exact and spec.params == count_parameters(AutoModelForCausalLM.from_config(config))
    config.save_pretrained(tmp_path)  # a local model directory reads the same
    assert load_model_spec(str(tmp_path)).params == spec.params
    assert load_model_spec(TINY).vocab == 50257  # no vocab_size in the file: GPT-2's default
    small = load_model_spec(os.path.join(ROOT, "configs/models/gpt2_small.json"))
    assert small.params == 124_439_808  # GPT-2 small, tied embeddings counted once


def saved_bytes(model, ids):
    """Bytes of the distinct storages autograd saves for backward during one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize(
    "attention,dropout,precision,ckpt",
    [
        ("sdpa", 0.1, "fp32", "none"),
        ("sdpa", 0.1, "fp32", "full"),
        ("eager", 0.1, "fp32", "none"),
        ("sdpa", 0.0, "fp32", "none"),
        ("sdpa", 0.1, "bf16", "none"),
    ],
)
def test_activation_formula_matches_saved_tensors(attention, dropout, precision, ckpt):
    """Tiny GPT-2 (4 x 128), micro-batch 4 x 64 tokens on CPU. The formula is calibrated term by term: today it is
    exact to the byte; 1% leaves room for small library changes."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.models import load_model_config

    torch.manual_seed(0)
    config = load_model_config(TINY)
    config.vocab_size, config.attn_pdrop, config.resid_pdrop, config.embd_pdrop = 257, dropout, dropout, dropout
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 section does to the model
    if ckpt == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = saved_bytes(model, torch.randint(0, 257, (4, 64)))
    plan = plan_memory(
        spec_from_config(config, "tiny", None),
        micro_batch=4,
        seq_len=64,
        precision=precision,
        device="cpu",
        checkpointing=ckpt,
    )
    assert plan["detail"]["activations_saved_forward"] == pytest.approx(measured, rel=0.01)
    if ckpt == "full":  # backward recomputes one block at a time on top of the saved block inputs
        assert plan["activations"] == measured + plan["detail"]["activation_per_layer"]


def test_korthikanti_formula_in_16_bit():
    """Eager attention, 1-byte masks (CUDA), exact GELU, f = 4h: 34sbh + 5as^2b per layer plus 4sb of LN stats."""
    spec = load_model_spec(layers=2, hidden=256, heads=4, vocab=1000)
    spec.activation, spec.attention = "gelu", "eager"
    s, b, h, a = 128, 2, 256, 4
    plan = plan_memory(spec, micro_batch=b, seq_len=s, precision="bf16")
    assert plan["detail"]["activation_per_layer"] == 34 * s * b * h + 5 * a * s * s * b + 2 * 2 * 2 * s * b


def test_checkpointing_offload_and_pipeline_move_memory():
    spec = load_model_spec(os.path.join(ROOT, "configs/models/gpt2_small.json"))
    base = dict(micro_batch=8, seq_len=1024, gpus_per_node=8)
    none, full, every = (
        plan_memory(spec, checkpointing=c, every_k=3 if c == "every_k" else None, **base)
        for c in ("none", "full", "every_k")
    )
    assert full["activations"] < every["activations"] < none["activations"]
    assert every["detail"]["activations_recompute"] == 3 * none["detail"]["activation_per_layer"]
    z2, off = (plan_memory(spec, zero_stage=2, offload_optimizer=o, **base) for o in (False, True))
    assert off["optimizer_states"] == 0 and off["gradients"] == 0 and off["cpu_offload_per_node"] > 0
    assert off["total"] < z2["total"]
    pipe = plan_memory(spec, pipeline_stages=2, **base)
    assert pipe["parameters"] == pytest.approx(none["parameters"] / 2, rel=0.01)
    # 1F1B: the first stage holds 2 micro-batches of half the layers, i.e. all layers' worth
    assert pipe["detail"]["activations_saved_forward"] >= 12 * none["detail"]["activation_per_layer"]


def test_fit_search_ranks_setups_that_fit():
    spec = load_model_spec(layers=32, hidden=4096, heads=32, params=7.5e9)
    rows = fit_search(spec, "A100-40GB", gpus_per_node=8, micro_batch=1, seq_len=2048)
    usable = fits(0, "A100-40GB")["usable"]
    assert rows and all(r["total"] <= usable for r in rows)
    times = [r["relative_step_time"] for r in rows]
    assert times == sorted(times)
    assert not any(r["zero_stage"] == 0 for r in rows)  # 16 B/param = 120 GB cannot fit 40 GB
    assert rows[0]["relative_step_time"] == min(
        step_cost(r["zero_stage"], r["offload_optimizer"], r["offload_param"], r["checkpointing"], r["optimizer"])
        for r in rows
    )
    tiny = fit_search(load_model_spec(TINY, vocab=257), "T4", micro_batch=8, seq_len=128)
    assert tiny[0]["zero_stage"] == 0 and tiny[0]["relative_step_time"] == 1.0


def test_deepspeed_estimator_and_where_it_differs():
    spec = load_model_spec(os.path.join(ROOT, "configs/models/gpt2_small.json"))
    psi = spec.params
    ds2 = deepspeed_estimate(spec, 2, gpus_per_node=8)
    assert ds2["gpu"] == 2 * psi + int(18 * psi / 8)  # 16-bit params + 18 B/param partitioned (incl. fp32 grads)
    ours = model_states(plan_memory(spec, zero_stage=2, gpus_per_node=8, seq_len=8))
    assert ours == pytest.approx(2 * psi + 14 * psi / 8, rel=1e-6)  # the paper: no fp32 gradient copy
    ds3 = deepspeed_estimate(spec, 3, gpus_per_node=8)
    assert ds3["gpu"] == 4 * spec.largest_layer + int(18 * psi / 8)
    assert deepspeed_estimate(spec, 1) is None  # DeepSpeed has no stage-0/1 estimator


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", TINY, "--gpu", "Z80"], "GPU 'Z80'"),
        (["--model", TINY, "--micro-batch", "-1"], "micro_batch"),
        (["--model", "no/such/config.json"], "file not found"),
        (["--model", TINY, "--optimizer", "adamw_3bit"], "unknown optimizer"),
        (["--model", TINY, "--offload-param", "--zero", "2"], "needs ZeRO stage 3"),
        (["--model", TINY, "--seq-len", "4096"], "exceeds"),
        (["--model", "not-a-local-model-xyz"], "cannot read a model config"),
        (["--layers", "4", "--hidden", "100", "--heads", "3"], "not divisible"),
    ],
)
def test_bad_input_is_one_line(argv, needle, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_human_table_and_gpu_table(capsys):
    assert {
        "K80",
        "RTX-2080Ti",
        "V100-16GB",
        "V100-32GB",
        "A100-40GB",
        "A100-80GB",
        "H100-80GB",
        "H200-141GB",
        "L4",
    } <= set(GPUS)
    assert cli.main(["plan", "--model", TINY, "--vocab", "257", "--gpu", "k80", "--micro-batch", "8"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer states", "activations", "buffers", "total", "fits K80"):
        assert word in out


def test_cli_json_output_parses():
    # explicit numbers: the CLI then imports neither torch nor transformers
    proc = subprocess.run(
        [
            os.path.join(BIN, "dsrecipes"),
            "plan",
            "--layers",
            "4",
            "--hidden",
            "128",
            "--heads",
            "4",
            "--vocab",
            "257",
            "--zero",
            "2",
            "--gpus",
            "2",
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--micro-batch",
            "8",
            "--seq-len",
            "128",
            "--gpu",
            "T4",
            "--json",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    parts = ("parameters", "gradients", "optimizer_states", "activations", "buffers")
    assert plan["total"] == pytest.approx(sum(plan[k] for k in parts), abs=len(parts))
    assert plan["fit"]["fits"] is True and plan["inputs"]["zero_stage"] == 2
