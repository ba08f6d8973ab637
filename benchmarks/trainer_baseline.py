"""The Hugging Face `Trainer` baseline of `make bench-throughput`: the same model, data, DeepSpeed JSON and
hyperparameters as recipes/train_lm.py, trained by `transformers.Trainer` instead of the recipe's loop.

Run (bench_throughput.py does this):
    accelerate launch --config_file configs/accelerate/deepspeed_cpu_2proc.yaml \
        benchmarks/trainer_baseline.py --config configs/recipes/train_tiny_zero2.yaml --deepspeed_json \
        configs/deepspeed/zero2.json --output_dir /tmp/trainer [--key value ...]   (train_lm keys)
Produces: output_dir/summary.json with steps, tokens, tokens_per_s (first to last step, like the recipe) and
steady_tokens_per_s (step 10 to the last step).
"""

import json
import os
import sys
import time

from transformers import Trainer, TrainerCallback, TrainingArguments

from dsrecipes.compat import fix_cpu_deepspeed_world_size
from dsrecipes.config.args import RECIPES, parse_args
from dsrecipes.train.data import build_lm_datasets, load_tokenizer
from dsrecipes.train.models import build_causal_lm


class Clock(TrainerCallback):
    """Times the optimizer steps: from train begin, and from the end of step 10 (warm-up excluded)."""

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.t_last = time.time()
        if state.global_step == 10:
            self.t10 = self.t_last


def main(argv):
    ds_json = argv[argv.index("--deepspeed_json") + 1]
    argv = [a for i, a in enumerate(argv) if a != "--deepspeed_json" and (i == 0 or argv[i - 1] != "--deepspeed_json")]
    args, _ = parse_args(RECIPES["train_lm"], argv)
    fix_cpu_deepspeed_world_size()  # the recipe's fix for accelerate's CPU-DeepSpeed world size, applied here too
    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        optim="adamw_torch",
        dataloader_drop_last=True,
        deepspeed=ds_json,
        disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
    )  # keep the corrected state (Trainer resets it otherwise)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
    train_ds, _, _ = build_lm_datasets(args, tokenizer)
    model = build_causal_lm(args, tokenizer)
    clock = Clock()
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=[clock])
    result = trainer.train()
    world = trainer.accelerator.num_processes
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world * args.block_size
    tokens = args.max_steps * per_step
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
            json.dump(
                {
                    "steps": args.max_steps,
                    "world_size": world,
                    "tokens": tokens,
                    "tokens_per_s": tokens / (clock.t_last - clock.t0),
                    "steady_tokens_per_s": (args.max_steps - 10) * per_step / (clock.t_last - clock.t10),
                    "final_loss": result.training_loss,
                },
                fh,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
