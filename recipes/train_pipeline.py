"""Pipeline-parallel training of a GPT-2 or Llama-family causal LM with the DeepSpeed pipeline engine (1F1B), HF
weights in and out.

Run (2 CPU processes = 2 pipeline stages):
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        --deepspeed_config_file configs/deepspeed/zero1.json \
        recipes/train_pipeline.py --config configs/recipes/pipeline_tiny.yaml [--key value ...]
    (make pipeline does exactly this; `deepspeed --num_gpus 2 recipes/train_pipeline.py ...` or torchrun work too,
    then the DeepSpeed JSON comes from deepspeed_config, default configs/deepspeed/zero1.json)

accelerate only launches the processes here: its DeepSpeed integration cannot drive a PipelineModule, so this
script calls deepspeed.initialize itself (dsrecipes.pipeline.engine), with the JSON that accelerate names
(dsrecipes.pipeline.setup). ZeRO 0 and 1 only. The pipeline settings (num_stages, partition_method,
activation_checkpoint_interval) live in the recipe YAML, not the JSON.

Produces, in output_dir: metrics.jsonl (loss, tokens/s and the measured pipeline bubble per logged step),
summary.json, tensorboard/, checkpoints/step_*/ (+ latest) and final/ (a Hugging Face model directory).
"""

import os
import sys
import time

import torch.distributed as dist
from transformers import set_seed

from dsrecipes.config.args import recipe_main
from dsrecipes.pipeline.bubble import BubbleMeter
from dsrecipes.pipeline.engine import (
    EngineRun,
    MicroBatches,
    build_engine,
    check_batches,
    engine_summary,
    eval_micro_batches,
    load_datasets,
)
from dsrecipes.pipeline.hf_weights import export_hf
from dsrecipes.pipeline.setup import init_distributed, prepare
from dsrecipes.train.checkpoints import StopFlag
from dsrecipes.train.data import load_tokenizer
from dsrecipes.train.loop import Loop, Session
from dsrecipes.train.throughput import FlopCounter


@recipe_main("train_pipeline")  # parses YAML + CLI into args; a ConfigError is one line, exit 2
def main(args, where):
    # ------------------------------------------------------------------ parse, check, build
    settings = prepare(args, where)  # every check that needs no process group
    init_distributed()
    rank, stop, t_start = dist.get_rank(), StopFlag(), time.time()
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
    train_ds, eval_ds, data_info = load_datasets(args, tokenizer)
    engine, pipe, config = build_engine(args, settings, tokenizer, where)
    meter, run, dp_rank = BubbleMeter(engine), EngineRun(engine), engine.grid.get_data_parallel_rank()
    facts = engine_summary(args, engine, pipe)  # collective: parameters counted once over the stages

    # ------------------------------------------------------------------ the shared loop around train_batch
    session = Session(run, args, stop, project="train_pipeline", where=where)  # checkpoints, resume, log, tensorboard
    flops = FlopCounter(shapes=[(facts["params"], config.num_hidden_layers, config.hidden_size)])
    loop = Loop(session, args, flops=flops)
    micro = args.per_device_train_batch_size
    batches = MicroBatches(train_ds, micro, dp_rank, settings.dp, args.seed, loop.epoch, loop.batch_in_epoch)
    eval_batches = eval_micro_batches(eval_ds, micro, dp_rank, settings.dp, args.max_eval_batches)
    check_batches(batches, eval_batches, args, where)
    loop.resume()
    loop.scheduler = engine.lr_scheduler  # the lr that is logged
    tokens_per_step = micro * args.gradient_accumulation_steps * settings.dp * args.block_size

    def step_fn():  # one optimizer step: the engine runs all micro-batches (1F1B) and steps
        with loop.timer.part("train_batch"), meter.step():
            loss = float(engine.train_batch(batches))
        loop.epoch, loop.batch_in_epoch = batches.epoch, batches.position
        loop.data_sum, batches.data_sum = loop.data_sum + batches.data_sum, 0
        loop.count_tokens(tokens_per_step, args.block_size)
        return loss, {}

    def evaluate():
        return float(engine.eval_batch(iter(eval_batches), num_micro_batches=len(eval_batches)))

    loop.drive(step_fn, evaluate, log_fields=meter.collect)
    totals = meter.collect(total=True)

    # ------------------------------------------------------------------ export and summary
    final_dir, tied_diff = None, None
    if not loop.preempted and args.export_final:
        final_dir = os.path.join(args.output_dir, "final")
        tied_diff = export_hf(pipe, config, tokenizer, final_dir)
    summary = {
        "recipe": "train_pipeline",
        **loop.summary(),
        "unigram_entropy": data_info["unigram_entropy"],
        "entropy_rate": data_info["entropy_rate"],
        "train_blocks": data_info["train_blocks"],
        "eval_micro_batches": len(eval_batches),
        "world_size": settings.world,
        "data_parallel_size": settings.dp,
        **facts,
        "deepspeed_config": settings.ds_path,
        "mixed_precision": settings.precision,
        "wall_time_s": time.time() - t_start,
        "tokens_per_step": tokens_per_step,
        "bubble": totals,
        "tied_max_abs_diff": tied_diff,
        "final_dir": final_dir,
    }
    session.log.summary(summary)
    session.close()
    if rank == 0:
        step, first, last, ev = loop.step, loop.first_loss, loop.train_loss, loop.eval_loss
        what = f"trained {step} steps"
        if loop.preempted:
            what = f"preempted at step {step}; resume with --resume_from latest"
        print(
            f"{what} on {args.num_stages} pipeline stages x {settings.dp} data-parallel: loss {first:.3f} -> "
            f"{last:.3f}, eval loss {ev:.3f}, bubble {totals['bubble_measured']:.3f} measured vs "
            f"{totals['bubble_formula']:.3f} formula; outputs in {os.path.abspath(args.output_dir)}"
            + (f"; model in {final_dir}" if final_dir else "")
        )
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
