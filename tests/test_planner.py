"""Memory planner (`dsrecipes plan`): ZeRO paper figures, exact parameter counts, activation bytes against what
HF GPT-2 and HF Llama/Qwen2 really save for backward (saved-tensor hooks; Llama on calibration and check sizes),
sp/tp terms and refusals, --fit ranking with sp/tp, DeepSpeed's estimator, one-line errors; slow: the planner
against 2-rank Ulysses (sp=2) and AutoTP (tp=2, recipes/train_lm.py) measurements.

Run: .venv/bin/python -m pytest tests/test_planner.py -q -m "not slow"   (fast; one CLI subprocess)
     .venv/bin/python -m pytest tests/test_planner.py -q -m slow         (sp=2: 2 spawned ranks; tp=2: one launch)
"""

import json
import os
import subprocess

import pytest
import torch

from conftest import BIN, ROOT, child_env
from dsrecipes import cli
from dsrecipes.config.errors import ConfigError
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


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama_untied", "tiny_qwen2"])
def test_exact_parameter_count_llama_family(name):
    """GQA, SwiGLU, RMSNorm, untied heads, Qwen2's q/k/v biases: the meta-device count is the built model's; the
    explicit --arch llama shape agrees with it where it applies (no biases)."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.models import count_parameters, load_model_config

    path = os.path.join(ROOT, f"configs/models/{name}.json")
    spec = load_model_spec(path, vocab=257)
    config = load_model_config(path)
    config.vocab_size = 257
    model = AutoModelForCausalLM.from_config(config)
    assert spec.exact and spec.family == "llama" and spec.params == count_parameters(model)
    assert (spec.kv_heads, spec.head_dim, spec.tied) == (
        config.num_key_value_heads,
        128 // 4,
        config.tie_word_embeddings,
    )
    sharded = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2].endswith("_proj"))
    assert sum(n for n, s in zip(spec.numels, spec.sharded) if s) == sharded  # what AutoTP splits
    if name != "tiny_qwen2":
        explicit = load_model_spec(
            layers=4, hidden=128, heads=4, kv_heads=2, ffn=344, vocab=257, arch="llama", tied=config.tie_word_embeddings
        )
        assert explicit.params == spec.params and explicit.sharded.count(True) == spec.sharded.count(True)


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


# Llama-family activations: calibrated (terms read off the saved tensors) on tiny_llama (4 x 128, 4 heads, 2 KV
# heads, f 344) at b=2, s=32 and 48; every other case below is a check size the formula was not derived on.
LLAMA_CASES = {
    "tiny_llama": ("tiny_llama", {}, 2, 48),
    "untied": ("tiny_llama_untied", {}, 2, 64),
    "qwen2_kv1": ("tiny_qwen2", {}, 2, 96),
    "6x192_kv3": (
        "tiny_llama",
        dict(num_hidden_layers=6, hidden_size=192, num_attention_heads=6, num_key_value_heads=3, intermediate_size=512),
        1,
        80,
    ),
    "mha_3x256": (
        "tiny_llama",
        dict(num_hidden_layers=3, hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=688),
        2,
        128,
    ),
    "head_dim48": (
        "tiny_llama",
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=48),
        3,
        40,
    ),
}


@pytest.mark.parametrize(
    "case,attention,precision,ckpt",
    [
        ("tiny_llama", "sdpa", "fp32", "none"),
        ("tiny_llama", "eager", "bf16", "full"),
        ("untied", "sdpa", "bf16", "full"),
        ("qwen2_kv1", "eager", "fp32", "none"),
        ("6x192_kv3", "sdpa", "bf16", "none"),
        ("mha_3x256", "sdpa", "fp32", "layer_selective"),
        ("head_dim48", "eager", "bf16", "every_k"),
    ],
)
def test_llama_activation_formula_matches_saved_tensors(case, attention, precision, ckpt):
    """HF Llama/Qwen2 (transformers 5): RMSNorm's fp32 upcast, RoPE cos/sin, GQA k/v, SwiGLU, DynamicCache copies,
    measured with dsrecipes.memory.measure.SavedActivations. Exact to a few bytes today; the target is 5%."""
    import types

    from transformers import AutoModelForCausalLM

    from dsrecipes.memory.activation_checkpointing import apply_activation_checkpointing
    from dsrecipes.memory.measure import SavedActivations
    from dsrecipes.train.models import load_model_config

    name, overrides, b, s = LLAMA_CASES[case]
    torch.manual_seed(0)
    config = load_model_config(os.path.join(ROOT, f"configs/models/{name}.json"))
    config.vocab_size = 257
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if ckpt != "none":
        args = types.SimpleNamespace(
            gradient_checkpointing=ckpt, gradient_checkpointing_reentrant=False, checkpoint_every_k=0
        )
        apply_activation_checkpointing(model, args)
    ids = torch.randint(0, 257, (b, s))
    with SavedActivations(model) as acts:
        model(input_ids=ids, labels=ids)
    spec = spec_from_config(config, case, None)
    plan = plan_memory(spec, micro_batch=b, seq_len=s, precision=precision, device="cpu", checkpointing=ckpt)
    assert spec.family == "llama" and acts.bytes > 0
    assert plan["detail"]["activations_saved_forward"] == pytest.approx(acts.bytes, rel=0.01)


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


# ---------------------------------------------------------------------------- sequence and tensor parallelism
LLAMA = os.path.join(ROOT, "configs/models/tiny_llama.json")


def test_sp_and_tp_terms_and_refusals():
    """sp: tokens per rank / sp, the all-to-all copy of the attention output, tiled MLP/loss savings; tp: only the
    block Linear layers shard (embeddings, norms, tied head replicated), ZeRO shards over world / tp."""
    spec = load_model_spec(LLAMA, vocab=257)
    spec.positions = None
    kw = dict(micro_batch=1, seq_len=1024, precision="fp32", device="cpu", gpus_per_node=2, zero_stage=1)
    one, two = plan_memory(spec, **kw), plan_memory(spec, sp=2, **kw)
    d1, d2 = one["detail"], two["detail"]
    assert d2["tokens_per_rank"] == 512 and d2["sp_all_to_all"] > 0 == d1["sp_all_to_all"]
    o_in = 4 * 512 * 128  # the all-to-all back is a new tensor: one e*t*h per block that sp=1 does not keep
    assert d2["activation_per_layer"] == pytest.approx(d1["activation_per_layer"] / 2 + o_in, rel=0.02)
    tiled = plan_memory(spec, sp=2, tiled_mlp=True, tiled_loss=True, **kw)
    assert tiled["detail"]["activation_per_layer"] == d2["activation_per_layer"] - 4 * 4 * 512 * 344  # no SwiGLU terms
    assert tiled["detail"]["activation_head"] == d2["activation_head"] - (4 * 257 + 8) * 512  # no log-softmax
    assert tiled["detail"]["mlp_recompute"] == 4 * 4 * 128 * 344  # one tile of ceil(512 / 128) = 4 recomputed
    tp = plan_memory(spec, tp=2, **kw)
    shard = sum(n for n, s in zip(spec.numels, spec.sharded) if s)
    assert tp["parameters"] == 4 * (spec.params - shard / 2)
    assert tp["detail"]["data_parallel"] == 1 and one["detail"]["data_parallel"] == 2
    assert tp["detail"]["activation_per_layer"] < d1["activation_per_layer"]  # shrinks inside the blocks ...
    assert tp["detail"]["activation_head"] == d1["activation_head"]  # ... not outside them
    for bad, needle in (
        (dict(sp=3), "do not split"),
        (dict(sp=2, zero_stage=0), "#7833"),
        (dict(tp=2, zero_stage=3), "ZeRO 0-2"),
        (dict(sp=2, tp=2, gpus_per_node=4), "not both"),
        (dict(tp=4, gpus_per_node=4), "KV heads"),
    ):
        with pytest.raises(ConfigError, match=needle):
            plan_memory(spec, **{**kw, **bad})


def test_fit_considers_sp_and_tp(capsys):
    """Llama-3-8B shape at 64K tokens on 8 x H100: nothing fits without sequence parallelism (the fp32 log-softmax
    alone is 34 GB); --fit finds sp > 1 setups, tiled ones among them."""
    argv = ["--arch", "llama", "--layers", "32", "--hidden", "4096", "--heads", "32", "--kv-heads", "8"]
    argv += ["--ffn", "14336", "--vocab", "128256", "--untied", "--gpus", "8", "--seq-len", "65536"]
    assert cli.main(["plan", *argv, "--fit", "--gpu", "H100-80GB", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["fits"]
    assert rows and all(r["sp"] > 1 for r in rows) and any(r["tiled"] for r in rows)
    assert rows[0]["relative_step_time"] == min(r["relative_step_time"] for r in rows)
    spec = load_model_spec(
        layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256, arch="llama", tied=False
    )
    assert spec.params == 8_030_261_248  # Llama 3 8B
    assert not fit_search(spec, "H100-80GB", gpus_per_node=8, seq_len=65536)  # sp/tp off: nothing fits
    assert cli.main(["plan", *argv, "--sp", "8", "--tiled-mlp", "--tiled-loss", "--zero", "3", "--checkpointing",
                     "full", "--gpu", "H100-80GB"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "8192 tokens per rank" in out and "sp all to all" in out and "tiling saves" in out


@pytest.fixture(scope="module")
def sp2_measured():
    """Per-rank bytes of tiny Llama at 512 tokens on 2 Ulysses ranks (benchmarks/bench_scale.py's measurement:
    torch.multiprocessing + gloo, DeepSpeed's UlyssesSPAttentionHF, the recipes' SP loss)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_scale

    jobs = [("measure", "sp2", "none", False, 512), ("measure", "sp2 tiled ckpt", "full", True, 512)]
    return bench_scale, bench_scale.spawn(2, jobs, "test_planner_sp2")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sp2", "sp2 tiled ckpt"])
def test_planner_matches_sp2_measurement(sp2_measured, name):
    bench, got = sp2_measured
    sp, ckpt, tiled = 2, ("full" if "ckpt" in name else "none"), "tiled" in name
    p = bench.plan(512, sp, ckpt, tiled)
    m = got[name]
    assert m["saved"] > 0 and (m["tiled_loss_held"] > 0) == tiled
    # hooks + what the tiled loss keeps on its autograd context (the planner counts both as saved)
    assert p["detail"]["activations_saved_forward"] == pytest.approx(m["saved"] + m["tiled_loss_held"], rel=0.10)


@pytest.mark.slow
def test_planner_matches_tp2_measurement(tmp_path):
    """recipes/train_lm.py under configs/deepspeed/zero1_tp2.json (AutoTP, 2 ranks): model states at the step and
    the first micro-batch's saved activations (summary.json "memory") against the planner, within 10%."""
    from conftest import launch_cmd, run, tiny_run

    flags = tiny_run(model_config=LLAMA, output_dir=str(tmp_path), max_steps=3, save_steps=100, eval_steps=100,
                     block_size=128)  # fmt: skip
    run(launch_cmd("recipes/train_lm.py", flags, deepspeed="configs/deepspeed/zero1_tp2.json"), timeout=900)
    memory = json.load(open(tmp_path / "summary.json"))["memory"]
    plan = plan_memory(load_model_spec(LLAMA, vocab=257), zero_stage=1, gpus_per_node=2, tp=2, precision="fp32",
                       device="cpu", micro_batch=4, seq_len=128)  # fmt: skip
    states = plan["parameters"] + plan["gradients"] + plan["optimizer_states"]
    assert states == pytest.approx(memory["at_step"]["model_states"], rel=0.10)
    assert plan["parameters"] == pytest.approx(memory["at_step"]["parameters"], rel=0.10)
    assert plan["detail"]["activations_saved_forward"] == pytest.approx(
        memory["activation_bytes_per_micro_batch"], rel=0.10
    )


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", LLAMA, "--sp", "3", "--gpus", "2", "--zero", "1"], "groups of 3"),
        (["--model", LLAMA, "--sp", "2", "--gpus", "2", "--seq-len", "255", "--zero", "1"], "equal shards"),
        (["--model", LLAMA, "--tp", "2", "--gpus", "2", "--zero", "3"], "ZeRO 0-2"),
        (["--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "3", "--arch", "llama"], "KV heads"),
        (["--layers", "2", "--hidden", "128", "--heads", "4", "--sp", "0"], "sp"),
    ],
)
def test_parallel_bad_input_is_one_line(argv, needle, capsys):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
