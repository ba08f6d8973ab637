"""The pipeline engine on Llama-family models (dsrecipes.pipeline.llama_layers): 2 pipeline stages on CPU (gloo).

- the 2-stage loss and gradients equal the unsplit HF model's on the same batch: tied Llama (GQA, RMSNorm, RoPE,
  SwiGLU; type:block, and under non-reentrant checkpointing of every layer), untied Llama (parameters partition,
  reentrant checkpointing) and tied Qwen2 (q/k/v biases, one KV head; uniform partition); the RoPE positions
  reach the second stage with the activations;
- HF checkpoint -> pipeline -> HF export gives the same tensors (tied and untied);
- configs/recipes/pipeline_tiny_llama.yaml trains through the documented launch line, and its final/ is a Llama
  whose eval loss is the one the engine reported.

Run: .venv/bin/python -m pytest tests/test_pipeline_llama.py -q       (both tests slow: about 2 minutes together)
This file is also the 2-process worker of the equivalence test:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_pipeline_llama.py ROOT_DIR OUT_JSON
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "configs/recipes/pipeline_tiny_llama.yaml"
MICRO, M, SEQ = 2, 4, 32  # 4 micro-batches of 2 x 32 tokens
# name -> (model config, partition method, checkpointing: None | "reentrant" | "non_reentrant")
CASES = {
    "llama_tied": ("configs/models/tiny_llama.json", "type:block", None),
    "llama_tied_ckpt": ("configs/models/tiny_llama.json", "type:block", "non_reentrant"),
    "llama_untied_ckpt": ("configs/models/tiny_llama_untied.json", "parameters", "reentrant"),
    "qwen2_tied": ("configs/models/tiny_qwen2.json", "uniform", None),
}


def make_hf_dir(path: str, model_config: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import byte_tokenizer
    from dsrecipes.train.models import load_model_config

    tok = byte_tokenizer()
    config = load_model_config(os.path.join(ROOT, model_config), tok)
    config.initializer_range = 0.1  # larger than the default: gradients well above float32 noise
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- worker (2 ranks)
def _worker(root: str, out_json: str) -> None:
    import argparse

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed import checkpointing
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dsrecipes.pipeline.hf_weights import export_hf, load_hf_weights, local_hf_modules, weight_source
    from dsrecipes.pipeline.layers import build_pipeline, pipeline_config

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for name, (model_config, method, ckpt) in CASES.items():
        hf_dir = os.path.join(root, os.path.basename(model_config).removesuffix(".json"))
        args = argparse.Namespace(model_name_or_path=hf_dir, model_config=None)
        config = pipeline_config(args)
        source = weight_source(args, config)
        x = torch.randint(0, config.vocab_size, (MICRO * M, SEQ), generator=torch.Generator().manual_seed(1))
        x[0, :4] = config.pad_token_id  # the padding row of the embedding gets no gradient, as in the HF model
        micro = [(x[i * MICRO : (i + 1) * MICRO], x[i * MICRO : (i + 1) * MICRO]) for i in range(M)]

        ref = AutoModelForCausalLM.from_pretrained(hf_dir)
        ref_loss = ref(input_ids=x, labels=x).loss
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}

        func = {"reentrant": checkpointing.checkpoint, "non_reentrant": checkpointing.non_reentrant_checkpoint}
        pipe = build_pipeline(config, 2, method, 1 if ckpt else 0, activation_checkpoint_func=func.get(ckpt))
        load_hf_weights(pipe, source)
        block_calls, positions = [], []
        for mod in pipe.modules():
            if type(mod).__name__.endswith("DecoderBlockPipe"):
                block_calls.append(0)
                i, calls, seen = len(block_calls) - 1, block_calls, positions
                mod.register_forward_hook(lambda *_, i=i, calls=calls: calls.__setitem__(i, calls[i] + 1))
                mod.register_forward_pre_hook(lambda _m, inp, seen=seen: seen.append(inp[0][1][0].tolist()))
        ds = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": M,
            "train_batch_size": MICRO * M,
            "gradient_clipping": 0.0,  # DeepSpeed's default clips: raw gradients here
            "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=0.0), config=ds)
        names = {id(p): prefix + n for prefix, mod in local_hf_modules(pipe) for n, p in mod.named_parameters()}
        grads, step = {}, engine.optimizer.step

        def capture(*a, step=step, names=names, pipe=pipe, grads=grads, **kw):
            grads.update({names[id(p)]: p.grad.clone() for p in pipe.parameters() if id(p) in names})
            return step(*a, **kw)

        engine.optimizer.step = capture
        loss = engine.train_batch(iter(micro)).item()
        rel = {
            k: ((g - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp_min(1e-12)).item()
            for k, g in grads.items()
        }
        embed = grads.get("model.embed_tokens.weight")
        local = {
            "loss": loss,
            "ref_loss": ref_loss.item(),
            "grad_rel": max(rel.values()),
            "n_grads": len(grads),
            "blocks": len(block_calls),
            "block_calls": sorted(set(block_calls)),
            "positions_ok": all(p == list(range(SEQ)) for p in positions),
            "pad_row_grad": None if embed is None else embed[config.pad_token_id].abs().max().item(),
            "partition": [int(v) for v in pipe.parts],
        }
        pipe_fresh = build_pipeline(config, 2, "uniform")
        load_hf_weights(pipe_fresh, source)
        tied_diff = export_hf(pipe_fresh, config, None, os.path.join(root, f"export_{name}"))
        if dist.get_rank() == 0:
            src = load_file(os.path.join(hf_dir, "model.safetensors"))
            exp = load_file(os.path.join(root, f"export_{name}", "model.safetensors"))
            local["roundtrip_equal"] = src.keys() == exp.keys() and all(torch.equal(src[k], exp[k]) for k in src)
            local["roundtrip_tied_diff"] = tied_diff
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        results[name] = parts
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_json, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_two_stage_llama_loss_and_gradients_equal_the_hf_model(tmp_path):
    from conftest import free_port, run

    for model_config in {c[0] for c in CASES.values()}:
        make_hf_dir(str(tmp_path / os.path.basename(model_config).removesuffix(".json")), model_config)
    out_json = str(tmp_path / "eq.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    run([*cmd, "--master_port", str(free_port()), "tests/test_pipeline_llama.py", str(tmp_path), out_json], timeout=600)
    res = json.load(open(out_json))
    print(json.dumps({k: [{m: r[m] for m in ("loss", "ref_loss", "grad_rel")} for r in v] for k, v in res.items()}))
    for name, ranks in res.items():
        ckpt = CASES[name][2]
        first, last = ranks
        assert first["partition"] == last["partition"] and len(first["partition"]) == 3, (name, ranks)
        assert first["blocks"] + last["blocks"] == 4 and min(first["blocks"], last["blocks"]) >= 1, (name, ranks)
        for r in ranks:
            assert abs(r["loss"] - r["ref_loss"]) < 1e-5, (name, r)  # the last stage's loss; the others report it
            assert r["n_grads"] > 0 and r["grad_rel"] < 1e-5, (name, r)
            if r["blocks"]:
                assert r["positions_ok"], (name, r)  # RoPE positions 0..31 reach every decoder layer, both stages
                assert r["block_calls"] == [2 * M if ckpt else M], (name, r)  # checkpointing really recomputes
            if r["pad_row_grad"] is not None and name == "llama_untied_ckpt":
                assert r["pad_row_grad"] == 0.0, (name, r)  # padding_idx as in HF (a tied head gives it gradient)
        assert first["roundtrip_equal"] and first["roundtrip_tied_diff"] == 0.0, (name, first)


@pytest.mark.slow
def test_pipeline_tiny_llama_recipe_trains_and_exports_a_llama(tmp_path):
    """The shipped config from a saved Llama, decoder layer 0 frozen, every layer checkpointed (non-reentrant): the
    loss falls, final/ is a tied GQA Llama whose eval loss is the engine's, the frozen layer is the start's."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import launch_cmd, read_jsonl, run, summary
    from test_pipeline import eval_loss_of

    out, start_dir = str(tmp_path / "run"), make_hf_dir(str(tmp_path / "start"), "configs/models/tiny_llama.json")
    flags = ["--config", RECIPE, "--model_name_or_path", start_dir, "--max_steps", "6", "--logging_steps", "1"]
    flags += ["--eval_steps", "6", "--save_steps", "0"]
    flags += ["--max_eval_batches", "4", "--generated_docs", "300", "--eval_docs", "40", "--warmup_steps", "2"]
    flags += ["--freeze_first_n_blocks", "1", "--gradient_checkpointing", "full"]  # the techniques, on Llama names
    flags += ["--report_to", "none", "--output_dir", out]
    run(launch_cmd("recipes/train_pipeline.py", flags, deepspeed="configs/deepspeed/zero1.json"), timeout=600)
    steps = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and steps[-1]["loss"] < steps[0]["loss"], steps
    s = summary(out)
    assert s["status"] == "completed" and s["num_stages"] == 2 and s["tied_max_abs_diff"] == 0.0, s
    assert s["partition"] == [0, 3, 7], s  # embed + 2 decoder layers | 2 decoder layers + norm + tied head
    assert s["activation_checkpointing"] == {"mode": "full", "interval": 1, "reentrant": False}, s
    final = os.path.join(out, "final")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    loss = eval_loss_of(model, final)
    assert abs(loss - s["final_eval_loss"]) < 1e-4, (loss, s["final_eval_loss"])
    start = AutoModelForCausalLM.from_pretrained(start_dir)
    frozen = sum(p.numel() for p in start.model.layers[0].parameters())
    assert s["frozen_params"] == frozen and s["params"] > frozen, s
    before, after = start.model.layers[0].state_dict(), model.model.layers[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: bit for bit
    assert not torch.equal(start.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "model_type,extra,key,needle",
    [
        ("gpt_neox", {}, "model_type", "'gpt_neox' is not supported by the pipeline recipe"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window", "sliding-window"),
    ],
)
def test_what_the_llama_pipeline_cannot_build_is_one_config_error(tmp_path, model_type, extra, key, needle):
    import argparse

    from dsrecipes.config.errors import ConfigError
    from dsrecipes.pipeline.layers import pipeline_config
    from dsrecipes.train.data import byte_tokenizer

    with open(os.path.join(ROOT, "configs/models/tiny_qwen2.json")) as fh:
        values = {**json.load(fh), "model_type": model_type, **extra}
    path = str(tmp_path / "model.json")
    with open(path, "w") as fh:
        json.dump(values, fh)
    with pytest.raises(ConfigError) as exc:
        pipeline_config(argparse.Namespace(model_name_or_path=None, model_config=path), byte_tokenizer())
    assert exc.value.key == key and needle in exc.value.line(), exc.value.line()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
