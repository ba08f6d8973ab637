"""recipes/train_pipeline.py and dsrecipes.pipeline for real: 2 pipeline stages on CPU (gloo).

- the pipelined loss, gradients and clipped update equal the unsplit HF model's (ZeRO 0 and 1, three
  partition methods, activation checkpointing that really recomputes);
- HF checkpoint -> pipeline -> HF export gives the same tensors, and the tied head stays tied;
- the documented accelerate launch line trains, writes metrics/summary/checkpoints/final, and resumes exactly;
- techniques on the pipeline engine: static freezing (untied head + reentrant checkpointing; tied frozen head + bf16),
  HF-style gradient_checkpointing (same loss curve), bitsandbytes 8-bit (ZeRO-1) and torchao 8-bit (ZeRO-0);
- ZeRO-2, progressive freezing, the prefix cache, two checkpointing knobs and bad partition methods are refused
  with one line.

Run: .venv/bin/python -m pytest tests/test_pipeline.py -q        (about 6 minutes on 2 quiet cores)
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

    from dsrecipes.pipeline.hf_weights import export_hf, load_hf_weights, local_hf_modules, weight_source
    from dsrecipes.pipeline.layers import GPT2BlockPipe, build_pipeline, pipeline_config

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

    # 4. ZeRO-0, no clipping, DeepSpeed's non-reentrant checkpoint of every layer (gradient_checkpointing: full):
    #    the same gradients, and every block really runs twice per micro-batch (forward + recompute)
    from deepspeed import checkpointing

    ref_loss, ref_grads, _, _ = reference(0.0)
    pipe = build_pipeline(config, 2, "type:block", 1, activation_checkpoint_func=checkpointing.non_reentrant_checkpoint)
    load_hf_weights(pipe, source)
    calls = []
    for mod in pipe.modules():
        if isinstance(mod, GPT2BlockPipe):
            calls.append(0)
            mod.register_forward_hook(lambda *_, i=len(calls) - 1: calls.__setitem__(i, calls[i] + 1))
    engine = engine_for(pipe, 0, 0.0, 0.0)
    names = {id(p): prefix + n for prefix, mod in local_hf_modules(pipe) for n, p in mod.named_parameters()}
    grads, step = {}, engine.optimizer.step
    engine.optimizer.step = capture
    loss = engine.train_batch(iter(micro)).item()
    local.update(
        loss_diff_nr=abs(loss - ref_loss),
        grad_rel_nr=worst(grads, {k: ref_grads[k] for k in grads}),
        nr_block_calls=sorted(set(calls)),
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
        assert r["loss_diff_nr"] < 1e-5 and r["grad_rel_nr"] < 1e-5, r  # non-reentrant checkpointing, ZeRO-0
        assert r["nr_block_calls"] == [2 * M], r
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


def _train(hf_dir, tmp_root, name, *extra, deepspeed="configs/deepspeed/zero1.json", **env):
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
    run(launch_cmd("recipes/train_pipeline.py", args, deepspeed=deepspeed), timeout=600, **env)
    return out


def eval_loss_of(model, final: str) -> float:
    """Plain transformers' loss of `model` on the recipe's first 4 eval batches (4 x 4 blocks of the generated set):
    what the pipeline engine reports as final_eval_loss. tests/test_pipeline_llama.py uses it too."""
    import torch

    from dsrecipes.config.args import DataArguments, parse_args
    from dsrecipes.train.data import build_lm_datasets, load_tokenizer

    args, _ = parse_args((DataArguments,), ["--generated_docs", "300", "--eval_docs", "40"])
    _, eval_ds, _ = build_lm_datasets(args, load_tokenizer(None, final))
    ids = torch.as_tensor(eval_ds[:16]["input_ids"]).view(4, 4, -1)
    with torch.no_grad():
        return sum(model(input_ids=b, labels=b).loss.item() for b in ids) / 4


@pytest.fixture(scope="module")
def smoke_run(hf_dir, tmp_path_factory):
    return _train(hf_dir, str(tmp_path_factory.mktemp("pipe_runs")), "straight")


@pytest.mark.slow
def test_two_stage_run_writes_metrics_summary_checkpoints_and_final(smoke_run, hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import read_jsonl, summary

    steps = [r for r in read_jsonl(os.path.join(smoke_run, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and steps[-1]["loss"] < steps[0]["loss"]
    assert all(r["bubble_formula"] == pytest.approx(1 / 5) and 0 < r["bubble_measured"] < 1 for r in steps)
    s = summary(smoke_run)
    assert s["status"] == "completed" and s["num_stages"] == 2 and s["zero_stage"] == 1 and s["micro_batches"] == 4
    assert s["tied_max_abs_diff"] == 0.0 and s["partition"] == [0, 4, 8]
    # every token of the 6 steps counted once: micro-batch 4 x 4 micro-batches x 128 tokens x 1 data-parallel rank
    assert s["tokens_per_step"] == 4 * 4 * 128 and s["tokens"] == 6 * s["tokens_per_step"]
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["train_time_s"], rel=0.01)
    assert s["bubble"]["measured_steps"] == 5 and len(s["bubble"]["stage_idle_fraction"]) == 2
    assert len(s["bubble"]["bubble_per_step"]) == 5 and 0 < s["bubble"]["bubble_measured_median"] < 1
    ckpts = os.path.join(smoke_run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000006"
    assert os.path.isfile(os.path.join(ckpts, "step_00000003", "engine", "layer_02-model_states.pt"))
    # final/ is an HF model whose eval loss (the recipe's 4 eval micro-batches) is the one the engine reported
    final = os.path.join(smoke_run, "final")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    loss = eval_loss_of(model, final)
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


@pytest.mark.slow
@pytest.mark.parametrize("untie", [True, False], ids=["untied_head_reentrant_ckpt", "tied_frozen_head_bf16"])
def test_static_freezing_trains_only_the_rest(untie, hf_dir, tmp_path):
    """freeze_embeddings + freeze_first_n_blocks 1 set requires_grad=False before deepspeed.initialize; frozen weights
    come out unchanged and the blocks behind them train.
    untied: under reentrant full checkpointing (the embedding's output is made to require grad, or the checkpointed
    blocks behind it would get no gradient), and the tied head gets its own trainable copy (freeze_untie_head).
    tied: freeze_untie_head false under bf16: the head stays the frozen embedding, whose tied all-reduce is dropped."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import summary, train_curve

    extra = ("--gradient_checkpointing", "full", "--gradient_checkpointing_reentrant", "true")
    if not untie:
        extra = ("--freeze_untie_head", "false", "--mixed_precision", "bf16")
    out = _train(
        hf_dir,
        str(tmp_path),
        "frozen",
        *("--max_steps", "4", "--save_steps", "0", "--eval_steps", "4"),
        *("--freeze_embeddings", "true", "--freeze_first_n_blocks", "1", *extra),
    )
    start = AutoModelForCausalLM.from_pretrained(hf_dir)
    t = start.transformer
    frozen = sum(p.numel() for m in (t.wte, t.wpe, t.h[0]) for p in m.parameters())
    s, curve = summary(out), train_curve(out)
    assert s["status"] == "completed" and s["frozen_params"] == frozen and s["params"] > frozen, s
    assert curve[-1][1] < curve[0][1], curve
    final = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    f = final.transformer
    dtype = torch.float32 if untie else torch.bfloat16  # what the engine trained in
    for name in ("wte", "wpe", "h.0"):
        before, after = t.get_submodule(name).state_dict(), f.get_submodule(name).state_dict()
        assert all(torch.equal(before[k].to(dtype), after[k].to(dtype)) for k in before), name  # bit for bit
    assert not torch.equal(t.h[1].mlp.c_fc.weight.to(dtype), f.h[1].mlp.c_fc.weight.to(dtype))  # trained
    if untie:
        assert s["activation_checkpointing"] == {"mode": "full", "interval": 1, "reentrant": True}
        assert not final.config.tie_word_embeddings and final.lm_head.weight.data_ptr() != f.wte.weight.data_ptr()
        assert not torch.equal(final.lm_head.weight, f.wte.weight)  # the untied head kept learning
    else:
        assert s["mixed_precision"] == "bf16" and s["tied_max_abs_diff"] == 0.0
        assert final.config.tie_word_embeddings and final.lm_head.weight.data_ptr() == f.wte.weight.data_ptr()


@pytest.mark.slow
def test_hf_gradient_checkpointing_maps_to_the_pipeline_and_changes_no_number(smoke_run, hf_dir, tmp_path):
    """gradient_checkpointing: full (non-reentrant, as for the HF models) = activation_checkpoint_interval 1 with
    DeepSpeed's non_reentrant_checkpoint: the loss curve is the uncheckpointed run's."""
    from conftest import summary, train_curve

    out = _train(hf_dir, str(tmp_path), "ckpt", "--gradient_checkpointing", "full")
    s = summary(out)
    assert s["activation_checkpointing"] == {"mode": "full", "interval": 1, "reentrant": False}
    assert s["activation_checkpoint_interval"] == 1
    got, want = train_curve(out), train_curve(smoke_run)
    assert [(st, d) for st, _, d in got] == [(st, d) for st, _, d in want]  # the same data, step for step
    assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(got, want)), (got, want)


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer,zero,state_files",
    [
        ("adamw_8bit", 1, "*optim_states.pt"),  # bitsandbytes quantizes ZeRO-1's flat fp32 partitions
        ("torchao_adamw_8bit", 0, "*model_states.pt"),  # torchao needs whole tensors: ZeRO-0 (the table refuses 1)
    ],
)
def test_8bit_optimizers_go_to_the_pipeline_engine(optimizer, zero, state_files, hf_dir, tmp_path):
    """A low-bit optimizer is handed to deepspeed.initialize as the client optimizer: the loss falls and the
    checkpointed optimizer state is 8-bit (bitsandbytes: uint8 moments; torchao: its 8-bit state tensors)."""
    import glob

    import torch

    from conftest import summary, train_curve

    out = _train(
        hf_dir,
        str(tmp_path),
        optimizer,
        *("--optimizer", optimizer, "--max_steps", "4", "--save_steps", "0", "--eval_steps", "4"),
        deepspeed=f"configs/deepspeed/zero{zero}.json",
    )
    s, curve = summary(out), train_curve(out)
    assert s["optimizer"] == optimizer and s["zero_stage"] == zero and curve[-1][1] < curve[0][1], (s, curve)
    files = glob.glob(os.path.join(out, "checkpoints", "step_00000004", "engine", state_files))
    assert files, os.listdir(os.path.join(out, "checkpoints", "step_00000004", "engine"))

    def kinds(obj, acc):  # (tensor class, dtype) of every tensor in a checkpoint
        if torch.is_tensor(obj):
            acc.add((type(obj).__name__, obj.dtype))
        elif isinstance(obj, dict):
            for v in obj.values():
                kinds(v, acc)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                kinds(v, acc)
        return acc

    found = set()
    for f in files:
        found |= kinds(torch.load(f, map_location="cpu", weights_only=False), set())
    if optimizer == "adamw_8bit":
        assert ("Tensor", torch.uint8) in found, found
    else:
        assert any(name == "OptimState8bit" for name, _ in found), found


@pytest.mark.parametrize(
    "extra,key,needle",
    [
        (["--freeze_schedule", "linear"], "freeze_schedule", "progressive freezing rebuilds the engine"),
        (["--freeze_embeddings", "true", "--freeze_cache", "memory"], "freeze_cache", "frozen-prefix cache"),
        (
            ["--gradient_checkpointing", "full", "--activation_checkpoint_interval", "2"],
            "activation_checkpoint_interval",
            "both set the pipeline's checkpointing",
        ),
    ],
)
def test_what_the_pipeline_cannot_run_is_one_config_error(extra, key, needle, tmp_path):
    from conftest import run

    cmd = [sys.executable, "recipes/train_pipeline.py", "--config", RECIPE, "--output_dir", str(tmp_path / "o")]
    proc = run([*cmd, *extra], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{RECIPE}: {key}: " in errors[0] and needle in errors[0], errors
    assert "Traceback" not in proc.stderr


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
