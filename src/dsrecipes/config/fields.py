"""Every recipe's fields: the HfArgumentParser dataclasses that recipe YAML and `--key value` flags fill.

dsrecipes.config.args parses into them (RECIPES names which recipe takes which) and re-exports them. One dataclass
per concern; a new technique with its own keys gets its own dataclass here or in a sibling module.
"""

from dataclasses import dataclass, field
from typing import Optional


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = _f(None, "Hub name or local HF directory. Unset: build from model_config.")
    model_config: str = _f("configs/models/tiny_gpt2.json", "HF config.json used when model_name_or_path is unset.")
    tokenizer_name_or_path: Optional[str] = _f(
        None, "Tokenizer dir or hub name. Unset: the model dir's tokenizer, else the built-in byte tokenizer."
    )
    gradient_checkpointing: str = _f(
        "none",
        "Activation checkpointing: none | full | every_k | layer_selective | selective_ops | deepspeed.",
        choices=["none", "full", "every_k", "layer_selective", "selective_ops", "deepspeed"],
    )
    gradient_checkpointing_reentrant: bool = _f(False, "Use reentrant torch.utils.checkpoint (HF full mode).")
    checkpoint_every_k: int = _f(
        0,
        "every_k: segment length (0 = round(sqrt(n_layer))); layer_selective: checkpoint blocks 0, k, 2k, ... and keep "
        "the others' activations (0 = 2).",
    )
    freeze_embeddings: bool = _f(False, "Static freezing: freeze token and position embeddings.")
    freeze_first_n_blocks: int = _f(0, "Static freezing: freeze the first n transformer blocks.")
    freeze_patterns: list[str] = _f([], "Static freezing: regexes of parameter names to freeze.")
    freeze_schedule: str = _f(
        "none",
        "Progressive freezing from the front (embeddings with block 0): none | linear | cubic (FreezeOut-style "
        "schedule) | adaptive (AutoFreeze-style, by gradient-norm change). Rebuilds the engine at each freeze point.",
        choices=["none", "linear", "cubic", "adaptive"],
    )
    freeze_progressive_blocks: int = _f(
        0, "Progressive freezing: leading blocks that may freeze; 0 = all but the last."
    )
    freeze_start: float = _f(
        0.3, "Progressive: fraction of max_steps when the first block freezes (adaptive: earliest)."
    )
    freeze_end: float = _f(0.7, "linear/cubic: fraction of max_steps when the last progressive block freezes.")
    freeze_check_steps: int = _f(10, "adaptive: steps per gradient-norm interval.")
    freeze_threshold: float = _f(0.1, "adaptive: freeze a block when its grad-norm relative change stays below this...")
    freeze_window: int = _f(2, "adaptive: ...for this many intervals in a row.")
    freeze_cache: str = _f(
        "none",
        "Frozen-prefix cache: none | memory | disk (reuse each sample's frozen-prefix output).",
        choices=["none", "memory", "disk"],
    )
    freeze_cache_max_mb: int = _f(1024, "Prefix cache bound per process in MiB; rows beyond it are recomputed.")
    freeze_cache_dir: Optional[str] = _f(None, "freeze_cache disk: directory (default: a temp dir removed at exit).")
    freeze_untie_head: bool = _f(
        True,
        "Tied input/output embeddings (GPT-2): when the embeddings freeze, the LM head "
        "gets its own trainable copy and keeps learning; false: it freezes with them.",
    )


@dataclass
class DataArguments:
    dataset: str = _f(
        "generated", "'generated' (built-in learnable corpus), a local .txt/.json/.jsonl/.parquet file, or a hub name."
    )
    dataset_config: Optional[str] = _f(None, "Hub dataset config name.")
    text_column: str = _f("text", "Column holding the text.")
    block_size: int = _f(128, "Tokens per training sequence.")
    generated_docs: int = _f(2000, "Generated corpus: number of training documents.")
    generated_seed: int = _f(1234, "Generated corpus: seed of the language (same seed = same language).")
    eval_docs: int = _f(200, "Generated corpus: held-out documents for eval.")
    eval_fraction: float = _f(0.05, "File or hub data without an eval split: fraction held out for eval.")
    max_eval_batches: int = _f(0, "Cap on eval batches per evaluation (0 = whole eval set).")


@dataclass
class TrainArguments:
    output_dir: str = _f("outputs/train_lm", "Where metrics.jsonl, summary.json, checkpoints/ and final/ go.")
    seed: int = _f(42, "Seed for model init, data order and dropout.")
    per_device_train_batch_size: int = _f(8, "Micro-batch per process (DeepSpeed train_micro_batch_size_per_gpu).")
    per_device_eval_batch_size: int = _f(16, "Eval batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_steps: int = _f(200, "Optimizer steps to train.")
    learning_rate: float = _f(1e-3, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping (DeepSpeed gradient_clipping).")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name: cosine, linear, constant_with_warmup, ...")
    warmup_steps: int = _f(10, "Linear warm-up steps.")
    optimizer: str = _f(
        "adamw",
        "adamw (torch; DeepSpeedCPUAdam under offload) | adamw_8bit | paged_adamw_8bit (bitsandbytes) | "
        "torchao_adamw_8bit | torchao_adamw_4bit.",
        choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "torchao_adamw_8bit", "torchao_adamw_4bit"],
    )
    logging_steps: int = _f(5, "Log every n optimizer steps.")
    eval_steps: int = _f(50, "Evaluate every n optimizer steps (and at the end).")
    save_steps: int = _f(100, "Checkpoint every n optimizer steps (0 = only at the end).")
    save_total_limit: int = _f(2, "Keep the last k checkpoints.")
    resume_from: Optional[str] = _f(None, "'latest' or a checkpoint directory.")
    report_to: str = _f("tensorboard", "accelerate tracker: tensorboard | none.", choices=["tensorboard", "none"])
    export_final: bool = _f(True, "Write output_dir/final/ as a Hugging Face model directory.")


@dataclass
class PipelineArguments:
    """recipes/train_pipeline.py: the DeepSpeed pipeline engine (the `pipeline` settings live here, not in the JSON)."""

    num_stages: int = _f(2, "Pipeline stages; the world size must be a multiple of it (the rest is data parallel).")
    partition_method: str = _f(
        "type:block",
        "How layers are split over stages: parameters | uniform | type:<regex> (balance the layers "
        "whose class name matches, e.g. type:block).",
    )
    activation_checkpoint_interval: int = _f(0, "Checkpoint activations every k layers inside a stage (0 = off).")
    deepspeed_config: Optional[str] = _f(
        None,
        "DeepSpeed JSON, ZeRO 0 or 1 only. Unset: the one `accelerate launch` names, else "
        "configs/deepspeed/zero1.json.",
    )
    mixed_precision: str = _f(
        "no", "no | bf16 | fp16 (or accelerate launch --mixed_precision).", choices=["no", "bf16", "fp16"]
    )


@dataclass
class DistillArguments:
    """recipes/distill.py: teacher, student and loss. ModelArguments' gradient_checkpointing/freeze_* apply to the
    student; the student's shape comes from the teacher (model_name_or_path/model_config are not used)."""

    teacher_name_or_path: Optional[str] = _f(
        None, "Teacher: a train_lm final/ dir, any local causal-LM dir or a hub name."
    )
    student_num_layers: int = _f(0, "Student blocks (same width as the teacher); 0 = half the teacher's.")
    student_init: str = _f(
        "teacher_layers",
        "teacher_layers: copy embeddings, head and every other block from the "
        "teacher (DistilBERT) | scratch: random init.",
        choices=["teacher_layers", "scratch"],
    )
    temperature: float = _f(2.0, "Softmax temperature T of the soft targets (the KL term is multiplied by T^2).")
    alpha_kd: float = _f(0.5, "Weight of the soft-target KL term.")
    alpha_ce: float = _f(0.5, "Weight of the hard-label cross-entropy term.")
    alpha_cos: float = _f(0.0, "Weight of the final-hidden-state cosine term (0 = off).")
    teacher_dtype: str = _f(
        "float32", "Teacher precision: float32 | bfloat16 | float16 (GPU).", choices=["float32", "bfloat16", "float16"]
    )
    teacher_engine: str = _f(
        "plain",
        "plain: a frozen copy per process | zero3: a second DeepSpeed plugin, ZeRO-3 partitioned over the "
        "processes (teacher larger than one GPU) | inference: deepspeed.init_inference.",
        choices=["plain", "zero3", "inference"],
    )
    scratch_baseline: bool = _f(
        True,
        "Also train the same student from scratch (hard labels, same steps) and "
        "evaluate teacher, distilled and scratch students on the same eval set.",
    )


@dataclass
class ServeArguments:
    """recipes/serve.py: what to serve, how (precision, int8, DeepSpeed, TP), where, and the safety caps."""

    model_name_or_path: Optional[str] = _f(
        None,
        "Causal LM for /v1/completions: an HF dir (train_lm's final/), or a "
        "ZeRO checkpoint dir (checkpoints/step_*/ or checkpoints/), consolidated at load.",
    )
    model_config: Optional[str] = _f(
        None, "ZeRO checkpoint only: the model JSON it was trained with (default: the run's final/config.json)."
    )
    tokenizer_name_or_path: Optional[str] = _f(None, "Tokenizer dir. Unset: the model dir's, else the byte tokenizer.")
    served_model_name: Optional[str] = _f(None, "Name clients pass as `model` (default: from the directory name).")
    embedding_model_name_or_path: Optional[str] = _f(None, "BERT-family encoder dir for /v1/embeddings (optional).")
    embedding_model_name: Optional[str] = _f(None, "Name of the embedding model (default: from the directory name).")
    dtype: str = _f(
        "fp32",
        "fp32 | bf16 | fp16 (GPU only). int8 is a quantization, see below.",
        choices=["fp32", "bf16", "fp16", "int8"],
    )
    quantization: str = _f(
        "none",
        "none | torch_int8_dynamic (fbgemm/x86 dynamic int8, the fast one on CPU) | torchao_int8_dynamic | "
        "torchao_int8_weight_only | bnb_int8 (bitsandbytes LLM.int8, GPU only).",
        choices=["none", "torch_int8_dynamic", "torchao_int8_dynamic", "torchao_int8_weight_only", "bnb_int8"],
    )
    engine: str = _f(
        "hf",
        "hf: plain transformers | deepspeed: deepspeed.init_inference (needed for tp_size > 1).",
        choices=["hf", "deepspeed"],
    )
    kernel_inject: bool = _f(False, "DeepSpeed kernel injection (CUDA only; recomputes the prefix each step).")
    tp_size: int = _f(1, "Tensor-parallel processes (AutoTP); launch with torchrun --nproc_per_node tp_size.")
    host: str = _f("127.0.0.1", "Bind address. Anything but loopback exposes the server: set api_key then.")
    port: int = _f(8000, "TCP port (0 = any free port; the chosen one is printed).")
    api_key: Optional[str] = _f(
        None, "Require `Authorization: Bearer <key>` on /v1/* and /metrics (env DSRECIPES_API_KEY also works)."
    )
    max_batch_size: int = _f(16, "Most sequences in one forward (and most prompts/inputs in one request).")
    max_wait_ms: float = _f(10.0, "When idle, wait this long for more requests before the first forward.")
    max_queue: int = _f(256, "Most sequences waiting for a batch slot; beyond it requests get 429.")
    max_tokens_limit: int = _f(256, "Cap on a request's max_tokens.")
    default_max_tokens: int = _f(16, "max_tokens when the request leaves it out (OpenAI's default is 16).")
    max_prompt_tokens: int = _f(1024, "Cap on a prompt's (or embedding input's) length in tokens.")
    max_body_bytes: int = _f(1_000_000, "Cap on a request body in bytes (413 beyond it).")
    num_threads: int = _f(0, "torch intra-op threads (0 = torch's default).")
    shutdown_timeout_s: float = _f(30.0, "On SIGTERM: how long in-flight requests may take to finish.")
    log_level: str = _f("warning", "uvicorn log level.", choices=["critical", "error", "warning", "info", "debug"])
