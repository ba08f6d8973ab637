"""recipes/train_pipeline.py and dsrecipes.pipeline.layers for real: 2 pipeline stages on CPU (gloo).

- the pipelined loss, gradients and clipped update equal the unsplit HF model's (ZeRO 0 and 1, three
  partition methods, activation checkpointing that really recomputes);
- HF checkpoint -> pipeline -> HF export gives the same tensors, and the tied head stays tied;
- the documented accelerate launch line trains, writes metrics/summary/checkpoints/final, and resumes exactly;
- ZeRO-2 and bad partition methods are refused with one line.

Run: .venv/bin/python -m pytest tests/test_pipeline.py -q        (about 3 minutes on 2 cores)
This file is also the 2-process worker of the equivalence test:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_pipeline.py HF_DIR OUT_JSON EXPORT_DIR
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "configs/recipes/pipeline_tiny.yaml"
MICRO, M, SEQ = 2, 4, 32  # equivalence batch: 4 micro-batches of 2 x 32 tokens


def make_hf_dir(path: str) -> str:
    """A tiny GPT-2 (4 blocks, tied embeddings, no dropout) saved by transformers, with the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    tok = byte_tokenizer()
    config = load_model_config(os.path.join(ROOT, "configs/models/tiny_gpt2.json"), tok)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("pipe") / "hf"))


# ---------------------------------------------------------------------------- worker (2 ranks)
def _worker(hf_dir: str, out_json: str, export_dir: str) -> None:
    import argparse

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dsrecipes.pipeline.layers import (
        GPT2BlockPipe,
        build_pipeline,
        export_hf,
        load_hf_weights,
        local_hf_modules,
        pipeline_config,
        weight_source,
    )

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    args = argparse.Namespace(model_name_or_path=hf_dir, model_config=None)
    config = pipeline_config(args)
    source = weight_source(args, config)
    x = torch.randint(0, config.vocab_size, (MICRO * M, SEQ), generator=torch.Generator().manual_seed(1))
    micro = [(x[i * MICRO : (i + 1) * MICRO], x[i * MICRO : (i + 1) * MICRO]) for i in range(M)]
    out = {}

    def reference(clip: float):
        ref = AutoModelForCausalLM.from_pretrained(hf_dir)
        before = {k: v.clone() for k, v in ref.state_dict().items()}
        loss = ref(input_ids=x, labels=x).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        torch.optim.SGD(ref.parameters(), lr=1.0).step()
        update = {k: before[k] - v for k, v in ref.state_dict().items()}
        return loss.item(), grads, update, before

    def engine_for(pipe, stage: int, clip: float, lr: float):
        ds = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": M,
            "train_batch_size": MICRO * M,
            "gradient_clipping": clip,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=lr), config=ds)
        return engine

    def worst(a: dict, b: dict, base: dict | None = None) -> float:  # max over tensors of max|a - b| / max|b|
        """With `base` (the weights before the step), a and b are updates measured as before - after: each is known
        only to the float32 spacing of the weight (one ulp of a LayerNorm weight near 1.0 is 1.2e-7, against updates
        of ~5e-4), so the part of |a - b| within one ulp of the weight is not counted as an error."""

        def err(k):
            diff = (a[k] - b[k]).abs()
            if base is not None:
                diff = (diff - torch.finfo(torch.float32).eps * base[k].abs()).clamp_min(0)
            return (diff.max() / b[k].abs().max().clamp_min(1e-12)).item()

        return max(err(k) for k in a)

    # 1. HF checkpoint -> pipeline (uniform partition) -> HF export, untouched
    pipe = build_pipeline(config, 2, "uniform")
    load_hf_weights(pipe, source)
    out["roundtrip_tied_diff"] = export_hf(pipe, config, None, export_dir)

    # 2. ZeRO-0, no clipping, type:block: raw gradients at the optimizer step
    ref_loss, ref_grads, _, _ = reference(0.0)
    pipe = build_pipeline(config, 2, "type:block")
    load_hf_weights(pipe, source)
    engine = engine_for(pipe, 0, 0.0, 0.0)
    names = {id(p): prefix + n for prefix, mod in local_hf_modules(pipe) for n, p in mod.named_parameters()}
    grads, step = {}, engine.optimizer.step

    def capture(*a, **kw):
        grads.update({names[id(p)]: p.grad.clone() for p in pipe.parameters() if id(p) in names})
        return step(*a, **kw)

    engine.optimizer.step = capture
    loss = engine.train_batch(iter(micro)).item()
    local = {"loss_diff": abs(loss - ref_loss), "grad_rel": worst(grads, {k: ref_grads[k] for k in grads})}

    # 3. ZeRO-1, clipping 1.0 (the HF norm is ~2.8), parameters partition, activation checkpointing every layer:
    #    the SGD(lr=1) update equals the unsplit model's clipped gradient
    ref_loss, _, ref_update, before = reference(1.0)
    pipe = build_pipeline(config, 2, "parameters", activation_checkpoint_interval=1)
    load_hf_weights(pipe, source)
    calls = []
    for mod in pipe.modules():
        if isinstance(mod, GPT2BlockPipe):
            calls.append(0)
            mod.register_forward_hook(lambda *_, i=len(calls) - 1: calls.__setitem__(i, calls[i] + 1))
    engine = engine_for(pipe, 1, 1.0, 1.0)
    loss = engine.train_batch(iter(micro)).item()
    update = {
        prefix + n: before[prefix + n] - p.detach()
        for prefix, mod in local_hf_modules(pipe)
        for n, p in mod.named_parameters()
    }
    local.update(
        loss_diff_z1=abs(loss - ref_loss),
        update_rel_z1=worst(update, ref_update, before),
        min_block_calls=min(calls),
        max_block_calls=max(calls),
        local_params=len(update),
    )

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    if dist.get_rank() == 0:
        out["ranks"] = parts
        with open(out_json, "w") as fh:
            json.dump(out, fh)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_pipelined_loss_gradients_and_export_equal_the_hf_model(hf_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import free_port, run

    out_json, export_dir = str(tmp_path / "eq.json"), str(tmp_path / "export")
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "tests/test_pipeline.py",
            hf_dir,
            out_json,
            export_dir,
        ],
        timeout=600,
    )
    res = json.load(open(out_json))
    for r in res["ranks"]:
        assert r["loss_diff"] < 1e-5 and r["loss_diff_z1"] < 1e-5, r
        assert r["grad_rel"] < 1e-5, r  # measured ~5e-8
        assert r["update_rel_z1"] < 1e-4, r  # measured ~4e-6 beyond weight rounding (global-norm clipping, 2 stages)
        assert r["min_block_calls"] == r["max_block_calls"] == 2 * M, r  # forward + recompute per micro-batch
        assert r["local_params"] > 0
    # roundtrip: the export holds exactly the source tensors, and the head is the embedding
    assert res["roundtrip_tied_diff"] == 0.0
    src, exp = (
        load_file(os.path.join(hf_dir, "model.safetensors")),
        load_file(os.path.join(export_dir, "model.safetensors")),
    )
    assert src.keys() == exp.keys() and all(torch.equal(src[k], exp[k]) for k in src)
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


_runs: dict = {}


def _train(hf_dir, tmp_root, name, *extra, **env):
    from conftest import launch_cmd, run

    out = os.path.join(tmp_root, name)
    args = [
        "--config",
        RECIPE,
        "--model_name_or_path",
        hf_dir,
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--eval_steps",
        "6",
        "--save_steps",
        "3",
        "--max_eval_batches",
        "4",
        "--generated_docs",
        "300",
        "--eval_docs",
        "40",
        "--warmup_steps",
        "2",
        "--report_to",
        "none",
        "--output_dir",
        out,
        *extra,
    ]
    run(launch_cmd("recipes/train_pipeline.py", args, deepspeed="configs/deepspeed/zero1.json"), timeout=600, **env)
    return out


@pytest.fixture(scope="module")
def smoke_run(hf_dir, tmp_path_factory):
    return _train(hf_dir, str(tmp_path_factory.mktemp("pipe_runs")), "straight")


@pytest.mark.slow
def test_two_stage_run_writes_metrics_summary_checkpoints_and_final(smoke_run, hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import read_jsonl, summary
    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.data import build_lm_datasets, load_tokenizer

    steps = [r for r in read_jsonl(os.path.join(smoke_run, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and steps[-1]["loss"] < steps[0]["loss"]
    assert all(r["bubble_formula"] == pytest.approx(1 / 5) and 0 < r["bubble_measured"] < 1 for r in steps)
    s = summary(smoke_run)
    assert s["status"] == "completed" and s["num_stages"] == 2 and s["zero_stage"] == 1 and s["micro_batches"] == 4
    assert s["tied_max_abs_diff"] == 0.0 and s["partition"] == [0, 4, 8] and s["tokens_per_s"] > 0
    assert s["bubble"]["measured_steps"] == 5 and len(s["bubble"]["stage_idle_fraction"]) == 2
    assert len(s["bubble"]["bubble_per_step"]) == 5 and 0 < s["bubble"]["bubble_measured_median"] < 1
    ckpts = os.path.join(smoke_run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000006"
    assert os.path.isfile(os.path.join(ckpts, "step_00000003", "engine", "layer_02-model_states.pt"))
    # final/ is an HF model whose eval loss (the recipe's 4 eval micro-batches) is the one the engine reported
    final = os.path.join(smoke_run, "final")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    args, _ = parse_args((DataArguments,), ["--generated_docs", "300", "--eval_docs", "40"])
    _, eval_ds, _ = build_lm_datasets(args, load_tokenizer(None, final))
    ids = torch.as_tensor(eval_ds[:16]["input_ids"]).view(4, 4, -1)
    with torch.no_grad():
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in ids) / 4
    assert abs(loss - s["final_eval_loss"]) < 1e-4, (loss, s["final_eval_loss"])
    # the trained weights differ from the start: training happened and was exported
    start = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert not torch.equal(start.transformer.h[3].mlp.c_fc.weight, model.transformer.h[3].mlp.c_fc.weight)


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_exactly(smoke_run, hf_dir, tmp_path):
    from conftest import summary, train_curve

    ckpt = os.path.join(smoke_run, "checkpoints", "step_00000003")
    resumed = _train(hf_dir, str(tmp_path), "resumed", "--resume_from", ckpt)
    assert train_curve(resumed) == [c for c in train_curve(smoke_run) if c[0] > 3]
    assert summary(resumed)["resumed_from"] == ckpt


def test_zero2_is_refused_with_one_line(tmp_path):
    from conftest import run

    proc = run(
        [
            sys.executable,
            "recipes/train_pipeline.py",
            "--config",
            RECIPE,
            "--deepspeed_config",
            "configs/deepspeed/zero2.json",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: configs/deepspeed/zero2.json: zero_optimization.stage: ZeRO-2 cannot be combined with "
        "pipeline parallelism (DeepSpeed's pipeline engine supports ZeRO 0 and 1 only); use "
        "configs/deepspeed/zero1.json (accelerate launch --deepspeed_config_file configs/deepspeed/zero1.json)"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "method,needle",
    [
        ("type:attention", "'type:attention' matches 0 layer(s)"),
        ("layers", "'layers' is not a partition method"),
        ("type:[", "bad regex"),
    ],
)
def test_bad_partition_method_is_one_config_error(method, needle):
    from dsrecipes.config.errors import ConfigError
    from dsrecipes.pipeline.layers import check_partition, layer_specs
    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    specs = layer_specs(load_model_config(os.path.join(ROOT, "configs/models/tiny_gpt2.json"), byte_tokenizer()))
    check_partition(specs, 2, "type:block")  # the default is fine
    with pytest.raises(ConfigError) as exc:
        check_partition(specs, 2, method)
    assert needle in exc.value.line() and exc.value.key == "partition_method"


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
