"""AutoTP training through DeepSpeed (`"tensor_parallel": {"autotp_size": 2}`, configs/deepspeed/zero*_tp2.json):
recipes/train_lm.py with 2 CPU processes forming one TP group, against data-parallel and one-process training of the
same model on the same global batch.

Launches are shared through module-scoped runs (each 20-120 s on 2 busy cores): tp=2 ZeRO-1 (Llama: GQA, tied
embeddings) is the run most tests read; ZeRO-3 runs 4 steps; Qwen2 (one KV head) runs ZeRO-2 with static freezing
and full activation checkpointing. The refusals are in-process (the rule table, parallel.tensor.check_model) plus
one launch that shows the start-up refusal as one line.

Run: .venv/bin/python -m pytest tests/test_tensor_parallel.py -q
"""

import os
import shutil

import pytest
import torch

from conftest import ROOT, dsrecipes_cli, launch_cmd, read_jsonl, run, summary, tiny_run, train_curve

LLAMA = "configs/models/tiny_llama.json"
TP_YAML = "configs/recipes/train_tiny_llama_tp2.yaml"  # tiny_llama; every run here starts from it
QWEN2 = "configs/models/tiny_qwen2.json"
QWEN_EXTRA = {"model_config": QWEN2, "freeze_first_n_blocks": 1, "gradient_checkpointing": "full"}
# name -> (processes, DeepSpeed JSON, overrides of tiny_run). Global batch 4 sequences in every run: a TP group is
# one data-parallel rank (4 per rank), the data-parallel run has 2 ranks of 2, the one-process run 4.
RUNS = {
    "tp2_zero1": (2, "zero1_tp2", {}),
    "dp2_zero1": (2, "zero1", {"per_device_train_batch_size": 2}),
    "tp1_zero1": (1, "zero1", {}),
    "tp2_zero3": (2, "zero3_tp2", {"max_steps": 4, "save_steps": 100}),
    "tp2_zero2_qwen2": (2, "zero2_tp2", {**QWEN_EXTRA, "save_steps": 100}),
    "tp1_zero2_qwen2": (1, "zero2", {**QWEN_EXTRA, "save_steps": 100}),
}
_runs: dict = {}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tensor_parallel"))


def train(tmp_root, name: str, *extra: str, out: str | None = None) -> str:
    if name not in _runs or out is not None:
        nproc, ds, overrides = RUNS[name]
        out = out or os.path.join(tmp_root, name)
        flags = tiny_run(TP_YAML, **overrides) + ["--output_dir", out, *extra]
        cmd = launch_cmd("recipes/train_lm.py", flags, deepspeed=f"configs/deepspeed/{ds}.json", num_processes=nproc)
        run(cmd, timeout=900)
        if extra:
            return out
        _runs[name] = out
    return _runs[name]


def _close(a: list, b: list, rtol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x[1] - y[1]) <= rtol * abs(y[1]) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- the same training as data parallel
@pytest.mark.slow
def test_tp2_zero1_loss_curve_and_data_match_data_parallel(tmp_root):
    tp, dp = train(tmp_root, "tp2_zero1"), train(tmp_root, "dp2_zero1")
    tp_curve, dp_curve = train_curve(tp), train_curve(dp)
    worst = max(abs(a[1] - b[1]) / b[1] for a, b in zip(tp_curve, dp_curve))
    print(f"tp=2 vs dp=2 (ZeRO-1, Llama): max relative loss difference {worst:.2e} over {len(tp_curve)} steps")
    assert len(tp_curve) == 8 and _close(tp_curve, dp_curve), (tp_curve, dp_curve)
    # Both ranks of the TP group trained on one batch (parallel.tensor.data_sum raises otherwise, at every logged
    # step), and the group counts once: the fingerprint and token count are those of 2 data-parallel ranks of 2.
    assert [d for _, _, d in tp_curve] == [d for _, _, d in dp_curve]
    s_tp, s_dp = summary(tp), summary(dp)
    assert s_tp["tokens"] == s_dp["tokens"] == 8 * 4 * 128
    assert s_tp["world_size"] == 2 and s_tp["tensor_parallel"]["tp_size"] == 2 and s_dp["tensor_parallel"] is None
    # eval counts each TP group once (parallel.tensor.gather_for_metrics): the same mean over the same samples
    assert abs(s_tp["final_eval_loss"] - s_dp["final_eval_loss"]) <= 1e-5 * s_dp["final_eval_loss"]


@pytest.mark.slow
def test_zero3_with_tp2_matches_data_parallel(tmp_root):
    z3, dp = train(tmp_root, "tp2_zero3"), train(tmp_root, "dp2_zero1")
    curve = train_curve(z3)
    assert summary(z3)["zero_stage"] == 3 and summary(z3)["status"] == "completed"
    assert _close(curve, train_curve(dp)[:4]), (curve, train_curve(dp)[:4])
    assert [d for _, _, d in curve] == [d for _, _, d in train_curve(dp)[:4]]


@pytest.mark.slow
def test_zero2_tp2_qwen2_frozen_checkpointed_matches_one_process(tmp_root):
    """Qwen2's single KV head: autotp_size 2 exceeds it (DeepSpeed warns that rank 1 holds no attention shard); the
    curve still equals one process's."""
    tp, one = train(tmp_root, "tp2_zero2_qwen2"), train(tmp_root, "tp1_zero2_qwen2")
    assert _close(train_curve(tp), train_curve(one)), (train_curve(tp), train_curve(one))
    # frozen_params counts this rank's tensors: the frozen block's Linear layers are halves on a TP rank
    assert 0.5 * summary(one)["frozen_params"] < summary(tp)["frozen_params"] < summary(one)["frozen_params"]
    assert summary(tp)["activation_checkpointing"] == summary(one)["activation_checkpointing"]


# ---------------------------------------------------------------------------- export and resume
@pytest.mark.slow
def test_final_is_whole_loads_with_from_pretrained_and_gives_the_eval_loss(tmp_root):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.accelerator import per_sample_lm_loss
    from dsrecipes.train.data import build_lm_datasets

    tp, one = train(tmp_root, "tp2_zero1"), train(tmp_root, "tp1_zero1")
    gathered = load_file(os.path.join(tp, "final", "model.safetensors"))
    whole = load_file(os.path.join(one, "final", "model.safetensors"))
    # The one-process export also writes the tied head (lm_head.weight is embed_tokens.weight); the TP one does not
    assert set(whole) - set(gathered) == {"lm_head.weight"} and set(gathered) <= set(whole)
    del whole["lm_head.weight"]
    for key, value in whole.items():  # every Linear weight gathered back to its full shape, the same values
        assert gathered[key].shape == value.shape, key
        assert torch.allclose(gathered[key], value, rtol=1e-4, atol=1e-5), key
    model = AutoModelForCausalLM.from_pretrained(os.path.join(tp, "final")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(tp, "final"))
    args, _ = parse_args((DataArguments,), ["--generated_docs", "300", "--eval_docs", "40"])
    _, eval_ds, _ = build_lm_datasets(args, tok)
    with torch.no_grad():
        ids, labels = eval_ds[:]["input_ids"], eval_ds[:]["labels"]
        loss = per_sample_lm_loss(model(input_ids=ids).logits, labels).mean().item()
    assert abs(loss - summary(tp)["final_eval_loss"]) < 1e-4, (loss, summary(tp)["final_eval_loss"])


@pytest.mark.slow
def test_resume_with_tp2_is_exact(tmp_root):
    straight = train(tmp_root, "tp2_zero1")
    resumed = os.path.join(tmp_root, "tp2_zero1_resumed")
    shutil.copytree(straight, resumed)
    for name in ("final", "checkpoints/step_00000008", "checkpoints/latest"):
        path = os.path.join(resumed, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    step4 = os.path.join(resumed, "checkpoints", "step_00000004")
    train(tmp_root, "tp2_zero1", "--resume_from", step4, out=resumed)
    assert summary(resumed)["resumed_from"] == step4
    assert train_curve(resumed) == train_curve(straight)  # steps 5-8 bit for bit, the data fingerprint too
    evals = [r for r in read_jsonl(os.path.join(resumed, "metrics.jsonl")) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]


# ---------------------------------------------------------------------------- per-rank bytes
@pytest.mark.slow
def test_state_bytes_halve_for_the_sharded_linear_layers(tmp_root):
    """Both runs have one data-parallel rank (ZeRO-1 shards nothing over one rank), so the measured parameter,
    gradient and AdamW bytes of a TP rank against the one process are AutoTP's sharding alone."""
    tp, one = summary(train(tmp_root, "tp2_zero1")), summary(train(tmp_root, "tp1_zero1"))
    shard = tp["tensor_parallel"]
    assert shard["sharded"]["ratio"] == 0.5  # every sharded layer holds exactly half (the tiny shapes divide by 2)
    families = shard["replicated"]["names"]
    assert "model.embed_tokens.weight" in families and "model.norm.weight" in families
    assert "model.layers.*.input_layernorm.weight" in families
    assert all(name.startswith("model.layers.*.") and name.endswith("_proj.weight") for name in shard["sharded_layers"])
    assert shard["unsharded_param_bytes"] == one["params"] * 4
    expected = shard["param_ratio"]  # (sharded / 2 + replicated) / whole model
    measured = {k: tp["memory"]["at_step"][k] / one["memory"]["at_step"][k] for k in ("parameters", "gradients")}
    measured["optimizer_states"] = (
        tp["memory"]["at_step"]["optimizer_states"] / one["memory"]["at_step"]["optimizer_states"]
    )
    replicated_share = shard["replicated"]["bytes"] / shard["unsharded_param_bytes"]
    print(
        f"tp=2 per rank: sharded Linear layers {shard['sharded']['bytes']} of {shard['sharded']['unsharded_bytes']} B "
        f"(ratio {shard['sharded']['ratio']}), replicated (embeddings, norms) {shard['replicated']['bytes']} B "
        f"= {replicated_share:.1%} of the model; expected model-state ratio {expected:.4f}, measured "
        + ", ".join(f"{k} {v:.4f}" for k, v in measured.items())
    )
    for kind, ratio in measured.items():
        assert abs(ratio - expected) <= 0.01, (kind, ratio, expected)
    assert 0.5 < expected < 0.6  # the tied 512 x 128 embedding is replicated: ~4.5% of the model on top of half


# ---------------------------------------------------------------------------- refusals, one line each
@pytest.mark.parametrize(
    "fields, rule",
    [
        ({"tp": 2, "world": 3}, "tp_divides_world"),
        ({"tp": 2, "lora": "lora"}, "tp_lora"),
        ({"tp": 2, "recipe": "pipeline"}, "tp_pipeline"),
    ],
)
def test_rule_table_refuses_in_one_line(fields, rule):
    from dsrecipes.config import rules

    s = rules.Settings(zero=1, device="cpu", **{"world": 2, **fields})
    fired = [r.id for r in rules.fired(s)]
    assert rule in fired
    err = rules.BY_ID[rule].error(s, {"recipe": "r.yaml", "deepspeed": "ds.json"})
    line = err.line() if hasattr(err, "line") else str(err)
    assert line.startswith("error: ") and "\n" not in line


def test_dsrecipes_check_refuses_lora_with_tp(tmp_path):
    recipe = tmp_path / "lora_tp.yaml"
    recipe.write_text(f"model_config: {LLAMA}\ndataset: generated\nlora_r: 8\n")
    proc = dsrecipes_cli(
        "check", "--recipe", str(recipe), "--deepspeed", os.path.join(ROOT, "configs/deepspeed/zero1_tp2.json")
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert any("lora_r: LoRA with AutoTP fails" in line for line in lines), proc.stderr


class _Acc:
    """The members check_model reads of an Accelerator: its DeepSpeed config and the process count."""

    def __init__(self, ds: dict, processes: int = 2):
        import types

        self.state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=ds))
        self.num_processes = processes


def _tp_json(name: str) -> dict:
    import json

    with open(os.path.join(ROOT, "configs/deepspeed", name)) as fh:
        return json.load(fh)


def _model(config_path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in _load(config_path).items() if not k.startswith("_")})
    config.vocab_size = 512
    return AutoModelForCausalLM.from_config(config)


def _load(path):
    import json

    with open(os.path.join(ROOT, path)) as fh:
        return json.load(fh)


@pytest.mark.parametrize(
    "model_config, edit, key",
    [
        ("configs/models/tiny_gpt2.json", {}, "model_config: AutoTP training does not support gpt2"),
        (LLAMA, {"tensor_parallel": {"autotp_size": 2}}, "tensor_parallel.vocab_parallel_lm_head: not false"),
        (LLAMA, {"train_batch_size": "auto"}, "train_batch_size: set with ZeRO-3 and AutoTP"),
    ],
)
def test_check_model_refuses_in_one_line(model_config, edit, key):
    from dsrecipes.config.errors import ConfigError
    from dsrecipes.parallel import tensor

    ds = {**_tp_json("zero3_tp2.json" if "train_batch_size" in edit else "zero1_tp2.json"), **edit}
    with pytest.raises(ConfigError) as info:
        tensor.check_model(_model(model_config), _Acc(ds), "r.yaml")
    line = info.value.line()
    assert line.startswith("error: ") and key in line and "\n" not in line, line
    tensor.check_model(_model(LLAMA), _Acc(_tp_json("zero1_tp2.json")), "r.yaml")  # the shipped config passes


@pytest.mark.slow
def test_gpt2_with_tp_stops_at_start_with_one_line(tmp_path):
    flags = tiny_run(max_steps=2) + ["--output_dir", str(tmp_path / "gpt2_tp")]
    proc = run(
        launch_cmd("recipes/train_lm.py", flags, deepspeed="configs/deepspeed/zero1_tp2.json"), timeout=600, check=False
    )
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "AutoTP training does not support gpt2" in errors[0], errors
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
