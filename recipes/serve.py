"""Serving recipe: an OpenAI-compatible HTTP server for a trained model (or any local HF model dir), with dynamic
and iteration-level batching, fp32/bf16/fp16, int8 (torch/torchao/bitsandbytes), and DeepSpeed init_inference
with tensor parallelism.

Run:
    make serve MODEL=outputs/train_tiny_zero2/final PORT=8000
    = python recipes/serve.py --config configs/recipes/serve_cpu.yaml --model_name_or_path DIR --port 8000
    tensor parallel, 2 processes (rank 0 serves HTTP and broadcasts each batch step to rank 1):
    torchrun --nproc_per_node 2 recipes/serve.py --config configs/recipes/serve_tp2_cpu.yaml \
        --model_name_or_path LLAMA_DIR

Produces: a server on 127.0.0.1:PORT with POST /v1/completions (logprobs, echo), POST /v1/chat/completions (the
model's chat template, else dsrecipes.chat's), POST /v1/embeddings, GET /v1/models, /health and /metrics.
Prints `serving MODELS on http://HOST:PORT` when ready. SIGTERM or Ctrl-C: stop accepting,
finish the requests in flight, exit 0.
"""

import datetime
import os
import signal
import sys

import torch

from dsrecipes.config.args import recipe_main
from dsrecipes.serve.app import Guard, build_app, serve_forever, served_name
from dsrecipes.serve.batcher import Batcher
from dsrecipes.serve.engine import Engine, KVBatch, Replicated, follow, supports_kv_merge
from dsrecipes.serve.loading import check_serve_args, load_encoder, load_lm
from dsrecipes.serve.metrics import Metrics


# ----------------------------------------------------------------------------- main
@recipe_main("serve")  # parses YAML + CLI into args; a ConfigError is one line, exit 2
def main(args, where):
    # ------------------------------------------------------------------ parse and check
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    check_serve_args(args, where, world)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if world > 1:
        import deepspeed

        # an idle server sits in a broadcast for as long as nobody calls: no collective timeout
        deepspeed.init_distributed(timeout=datetime.timedelta(days=365))
    api_key = args.api_key or os.environ.get("DSRECIPES_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: binding {args.host} without an api_key: anyone who can reach it can use it", file=sys.stderr)

    # ------------------------------------------------------------------ models (every rank loads its TP shard)
    engine = lm_name = tok = None
    max_context = 0
    if args.model_name_or_path:
        lm, tok = load_lm(args)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        kv = KVBatch(lm, pad, use_cache=not args.kernel_inject and supports_kv_merge(lm))
        if rank > 0:  # tensor-parallel follower: replay rank 0's batch steps until it says stop
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(kv)
            torch.distributed.destroy_process_group()
            return 0
        engine = Engine(lm, tok, args.max_batch_size, kv=Replicated(kv) if world > 1 else kv)
        lm_name, max_context = args.served_model_name or served_name(args.model_name_or_path), engine.max_context
    enc = load_encoder(args) if args.embedding_model_name_or_path else None
    enc_name = (args.embedding_model_name or served_name(args.embedding_model_name_or_path)) if enc else None

    # ------------------------------------------------------------------ serve until SIGTERM/SIGINT
    def stop_followers():
        if world > 1:
            torch.distributed.broadcast_object_list([("stop", ())], src=0)

    metrics = Metrics()
    batcher = Batcher(
        engine, enc, args.max_batch_size, args.max_wait_ms, args.max_queue, metrics, on_stop=stop_followers
    )
    enc_context = getattr(enc[0].config, "max_position_embeddings", 1 << 30) if enc else 0
    app = Guard(
        build_app(args, batcher, lm_name, tok, max_context, enc_name, enc[1] if enc else None, enc_context, metrics),
        args.max_body_bytes,
        api_key,
        metrics,
    )
    names = ", ".join(n for n in (lm_name, enc_name) if n)
    serve_forever(
        app,
        args,
        lambda url: print(
            f"serving {names} on {url} (max_batch_size {args.max_batch_size}, {args.dtype}, quantization "
            f"{args.quantization}, engine {args.engine}, tp {world})",
            flush=True,
        ),
    )
    if world > 1:
        torch.distributed.destroy_process_group()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
