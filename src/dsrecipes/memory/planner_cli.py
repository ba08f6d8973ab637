"""`dsrecipes plan`: predict per-GPU training memory before renting the GPUs, and which setup makes a run fit.

    dsrecipes plan --model configs/models/gpt2_small.json --zero 2 --gpus 8 --micro-batch 8 --seq-len 1024 \
        --gpu A100-40GB
    dsrecipes plan --layers 32 --hidden 4096 --heads 32 --params 7e9 --fit --gpu A100-80GB --gpus 8 --json

The arguments, the text and JSON output; the formulas are in dsrecipes.memory.planner (docs/planner.md).
"""

from __future__ import annotations

import json

from dsrecipes.memory.gpus import DEFAULT_HEADROOM, GPUS, GiB, gpu_memory
from dsrecipes.memory.model_spec import _bad, load_model_spec
from dsrecipes.memory.planner import CHECKPOINTING, OPTIMIZERS, deepspeed_estimate, fit_search, plan_memory


def add_arguments(parser):
    m = parser.add_argument_group("model (a config/dir/hub name, or explicit numbers)")
    m.add_argument("--model", help="config.json file, local model directory or hub name")
    for flag, kind in (
        ("--params", float),
        ("--layers", int),
        ("--hidden", int),
        ("--heads", int),
        ("--vocab", int),
        ("--ffn", int),
        ("--kv-heads", int),
    ):
        m.add_argument(
            flag,
            type=kind,
            help="vocab defaults to the config's, else 50257 (byte tokenizer: 257)" if flag == "--vocab" else None,
        )
    m.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="explicit numbers: block shape")
    m.add_argument("--untied", action="store_true", help="explicit numbers: the LM head has its own matrix")
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-param", action="store_true")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="default: the model's positions, at most 1024")
    parser.add_argument("--precision", default="bf16", help="fp32 | bf16 | fp16")
    parser.add_argument("--checkpointing", default="none", help=" | ".join(CHECKPOINTING))
    parser.add_argument(
        "--every-k", type=int, help="every_k: segment length (default round(sqrt(layers))); layer_selective: k (2)"
    )
    parser.add_argument("--optimizer", default="adamw", help=" | ".join(OPTIMIZERS))
    parser.add_argument("--frozen-fraction", type=float, default=0.0)
    parser.add_argument("--pipeline-stages", type=int, default=1)
    parser.add_argument("--sp", type=int, help="Ulysses sequence-parallel degree (1); with --fit: the largest tried")
    parser.add_argument("--tp", type=int, help="AutoTP tensor-parallel degree (1); with --fit: the largest tried")
    parser.add_argument("--tiled-mlp", action="store_true", help="ALST TiledMLP (MLP run in sequence tiles)")
    parser.add_argument("--tiled-loss", action="store_true", help="tiled logits + loss (logits never materialised)")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (CPU runs keep float dropout masks)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], help="default: the model config's")
    parser.add_argument("--gpu", help=f"GPU to fit: {', '.join(GPUS)}")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="fraction kept free (default 0.1)")
    parser.add_argument("--fit", action="store_true", help="search setups that fit --gpu, fastest first")
    parser.add_argument("--deepspeed", action="store_true", help="also show DeepSpeed's own estimate (ZeRO 2/3)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _fmt(n):
    return f"{n / GiB:9.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:9.1f} MiB"


def run(ns) -> int:
    explicit = [ns.params, ns.layers, ns.hidden, ns.heads, ns.ffn, ns.kv_heads]
    if (ns.model is None) == all(v is None for v in explicit):
        raise _bad("--model", "give a model in exactly one way", "--model FILE|DIR|NAME, or --layers --hidden --heads")
    spec = load_model_spec(
        ns.model,
        params=ns.params,
        layers=ns.layers,
        hidden=ns.hidden,
        heads=ns.heads,
        vocab=ns.vocab,
        ffn=ns.ffn,
        arch=ns.arch,
        kv_heads=ns.kv_heads,
        tied=not ns.untied,
    )
    kw = dict(
        gpus_per_node=ns.gpus,
        nodes=ns.nodes,
        micro_batch=ns.micro_batch,
        seq_len=ns.seq_len,
        precision=ns.precision,
        every_k=ns.every_k,
        frozen_fraction=ns.frozen_fraction,
        pipeline_stages=ns.pipeline_stages,
        device=ns.device,
        attention=ns.attention,
    )
    for key in ("sp", "tp"):
        if getattr(ns, key) is not None and getattr(ns, key) < 1:
            raise _bad(key, f"{getattr(ns, key)!r} must be a positive integer", f"give --{key} >= 1")
    if ns.fit:
        if not ns.gpu:
            raise _bad("--gpu", "--fit needs a GPU to fit", f"give --gpu, one of {', '.join(GPUS)}")
        most = {k: ns.gpus if getattr(ns, k) is None else getattr(ns, k) for k in ("sp", "tp")}
        rows = fit_search(spec, ns.gpu, ns.headroom, max_sp=most["sp"], max_tp=most["tp"], **kw)
        if ns.json:
            print(
                json.dumps(
                    {"model": spec.name, "params": spec.params, "gpu": gpu_memory(ns.gpu)[0], "fits": rows}, indent=2
                )
            )
        else:
            print(
                f"{spec.name}: {spec.params:,} params on {ns.nodes}x{ns.gpus} {gpu_memory(ns.gpu)[0]}; "
                f"{len(rows)} setup(s) fit (headroom {ns.headroom:.0%}), fastest first:"
            )
            print(
                f"  {'ZeRO':>4} {'offload':<15} {'checkpointing':<13} {'optimizer':<18} {'sp':>2} {'tp':>2} "
                f"{'tiled':<5} {'per GPU':>13} {'CPU/node':>13} {'time':>5}"
            )
            for r in rows:
                off = "opt+param" if r["offload_param"] else "optimizer" if r["offload_optimizer"] else "none"
                print(
                    f"  {r['zero_stage']:>4} {off:<15} {r['checkpointing']:<13} {r['optimizer']:<18} {r['sp']:>2} "
                    f"{r['tp']:>2} {'yes' if r['tiled'] else 'no':<5} {_fmt(r['total'])} "
                    f"{_fmt(r['cpu_offload_per_node'])} {r['relative_step_time']:5.2f}"
                )
        return 0 if rows else 1
    sp, tp = (1 if v is None else v for v in (ns.sp, ns.tp))
    plan = plan_memory(
        spec,
        zero_stage=ns.zero,
        offload_optimizer=ns.offload_optimizer,
        offload_param=ns.offload_param,
        checkpointing=ns.checkpointing,
        optimizer=ns.optimizer,
        gpu=ns.gpu,
        headroom=ns.headroom,
        sp=sp,
        tp=tp,
        tiled_mlp=ns.tiled_mlp,
        tiled_loss=ns.tiled_loss,
        **kw,
    )
    if ns.tiled_mlp or ns.tiled_loss:  # what the tiling saves: the same setup untiled
        same = {k: plan["inputs"][k] for k in ("zero_stage", "offload_optimizer", "offload_param", "checkpointing")}
        untiled = plan_memory(spec, **same, optimizer=ns.optimizer, sp=sp, tp=tp, **kw)
        plan["tiling_saves"] = untiled["total"] - plan["total"]
    if ns.deepspeed:
        plan["deepspeed_estimate"] = deepspeed_estimate(
            spec, ns.zero, ns.gpus, ns.nodes, ns.offload_optimizer, ns.offload_param
        )
    if ns.json:
        print(json.dumps(plan, indent=2))
        return 0
    i = plan["inputs"]
    print(
        f"model: {spec.name}: {spec.params:,} params{'' if spec.exact else ' (estimated)'}, {spec.layers} layers, "
        f"h={spec.hidden}, {spec.heads} heads, vocab {spec.vocab}"
    )
    print(
        f"setup: ZeRO-{i['zero_stage']}{' +offload optimizer' if i['offload_optimizer'] else ''}"
        f"{' +offload params' if i['offload_param'] else ''}, {ns.nodes}x{ns.gpus} GPUs, {i['precision']}, "
        f"micro-batch {i['micro_batch']} x {i['seq_len']} tokens, checkpointing {i['checkpointing']}, "
        f"{i['optimizer']}, frozen {i['frozen_fraction']:.0%}, pipeline stages {i['pipeline_stages']}, sp {i['sp']}, "
        f"tp {i['tp']}{', tiled MLP' if i['tiled_mlp'] else ''}{', tiled loss' if i['tiled_loss'] else ''}"
    )
    d = plan["detail"]
    for key in ("parameters", "gradients", "optimizer_states", "activations", "buffers", "total"):
        print(f"  {key.replace('_', ' '):<18} {_fmt(plan[key])}")
        if key == "parameters" and i["tp"] > 1:
            print(f"    {d['tp_sharded_fraction']:.0%} of the parameters sharded {i['tp']} ways, the rest replicated")
        if key == "activations" and i["sp"] > 1:
            print(
                f"    {d['tokens_per_rank']} tokens per rank (seq_len / sp); "
                f"recompute {_fmt(d['activations_recompute']).strip()}"
            )
        if key == "buffers":
            for sub in ("logits_transient", "sp_all_to_all", "buckets"):
                if d[sub]:
                    print(f"    {sub.replace('_', ' '):<16} {_fmt(d[sub])}")
    if "tiling_saves" in plan:
        print(f"  tiling saves       {_fmt(plan['tiling_saves'])}  (against the same setup untiled)")
    if plan["cpu_offload_per_node"]:
        print(f"  {'CPU per node':<18} {_fmt(plan['cpu_offload_per_node'])}  (offloaded states)")
    if plan.get("deepspeed_estimate"):
        d = plan["deepspeed_estimate"]
        print(f"  DeepSpeed's estimator (model states only): GPU {_fmt(d['gpu'])}, CPU {_fmt(d['cpu'])}")
    if plan["fit"]:
        f = plan["fit"]
        print(
            f"fits {f['gpu']} ({f['memory'] / GiB:.0f} GiB, {_fmt(f['usable']).strip()} usable with "
            f"{f['headroom']:.0%} headroom): {'yes' if f['fits'] else 'NO'}"
        )
    return 0
