"""Model loading for serving: a causal LM / encoder dir or a ZeRO checkpoint (consolidated), with precision,
int8 (torch, torchao, bitsandbytes) or DeepSpeed init_inference (kernel injection, AutoTP tensor parallelism).

    check_serve_args(args, "serve.yaml", world_size)        # impossible combinations -> one-line ConfigError
    lm, tok = load_lm(args)                                  # args: dsrecipes.config.args.ServeArguments
    encoder, enc_tok = load_encoder(args)
    vectors, n_tokens = embed(encoder, enc_tok, ["a text"])  # pooled as its sentence-transformers config says

Shared by recipes/serve.py and benchmarks/bench_serve.py; generation itself is in dsrecipes.serve.engine.
"""

from __future__ import annotations

import os
import warnings

import torch

from dsrecipes.config.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT8_FIX = "use engine: hf with quantization: torch_int8_dynamic | torchao_int8_dynamic | torchao_int8_weight_only"


# ----------------------------------------------------------------------------- checks
def check_serve_args(args, where: str, world_size: int = 1, cuda: bool | None = None) -> None:
    """Combinations that cannot work, as one-line ConfigErrors (before any model is loaded)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not args.model_name_or_path and not args.embedding_model_name_or_path:
        raise ConfigError(
            where,
            "model_name_or_path",
            "no model to serve",
            "give a causal LM directory (e.g. outputs/train_tiny_zero2/final) and/or embedding_model_name_or_path",
        )
    if args.dtype == "int8":
        if args.engine == "deepspeed":
            raise ConfigError(
                where, "dtype", "int8 through DeepSpeed init_inference is broken (DeepSpeed #8577)", INT8_FIX
            )
        raise ConfigError(
            where, "dtype", "int8 is a quantization, not a dtype", "set dtype: fp32 and pick a quantization"
        )
    if args.dtype == "fp16" and not cuda:
        raise ConfigError(
            where,
            "dtype",
            "fp16 needs a GPU (CPU matmuls in fp16 are unsupported or very slow)",
            "use fp32 or bf16 on CPU",
        )
    if args.quantization == "bnb_int8" and not cuda:
        raise ConfigError(
            where, "quantization", "bitsandbytes LLM.int8 needs a CUDA GPU", "on CPU use torch_int8_dynamic"
        )
    if args.engine == "deepspeed" and args.quantization != "none":
        raise ConfigError(
            where, "quantization", "int8 cannot go through DeepSpeed init_inference (DeepSpeed #8577)", INT8_FIX
        )
    if args.kernel_inject and (args.engine != "deepspeed" or not cuda):
        raise ConfigError(
            where,
            "kernel_inject",
            "DeepSpeed kernel injection needs engine: deepspeed and a CUDA GPU",
            "set kernel_inject: false (on CPU init_inference runs with replace_with_kernel_inject=False)",
        )
    if args.tp_size > 1 and args.engine != "deepspeed":
        raise ConfigError(
            where, "tp_size", "tensor parallelism runs through DeepSpeed init_inference", "set engine: deepspeed"
        )
    if args.tp_size != world_size:
        raise ConfigError(
            where,
            "tp_size",
            f"tp_size {args.tp_size} but {world_size} process(es) were launched",
            f"launch with torchrun --nproc_per_node {args.tp_size} (or set tp_size: {world_size})",
        )
    for key in ("max_batch_size", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes", "max_queue"):
        if getattr(args, key) < 1:
            raise ConfigError(where, key, f"must be >= 1, got {getattr(args, key)}", "use a positive number")
    if args.max_wait_ms < 0 or not 0 <= args.port <= 65535:
        raise ConfigError(where, "max_wait_ms/port", "out of range", "max_wait_ms >= 0 and 0 <= port <= 65535")


# ----------------------------------------------------------------------------- loading
def is_zero_checkpoint(path: str) -> bool:
    return (
        bool(path)
        and os.path.isdir(path)
        and (os.path.isfile(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "pytorch_model")))
    )


def resolve_zero_checkpoint(path: str) -> str:
    """A step dir (…/checkpoints/step_N) as is; a checkpoints/ dir through its `latest` pointer."""
    if os.path.isdir(os.path.join(path, "pytorch_model")):
        return path
    with open(os.path.join(path, "latest")) as fh:
        name = fh.read().strip()
    step = os.path.join(path, name)
    return step if os.path.isdir(os.path.join(step, "pytorch_model")) else path


def consolidated_state_dict(path: str) -> dict:
    """ZeRO shards (any stage, any world size) -> one fp32 state dict, with DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint is a bad input
        raise ConfigError(
            "<args>",
            "model_name_or_path",
            f"cannot consolidate ZeRO checkpoint {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
            "pass a complete checkpoints/step_* dir",
        ) from None


def _zero_model_config(args, ckpt: str, tok):
    """The HF config for a checkpoint: model_config (a configs/models JSON) if given, else final/config.json."""
    from transformers import AutoConfig

    from dsrecipes.train.models import load_model_config

    if args.model_config:
        return load_model_config(args.model_config, tok)
    final_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "final")
    if os.path.isfile(os.path.join(final_dir, "config.json")):
        return AutoConfig.from_pretrained(final_dir)
    raise ConfigError(
        "<args>",
        "model_config",
        f"{ckpt!r} is a ZeRO checkpoint without a config",
        "set model_config to the model JSON it was trained with (e.g. configs/models/tiny_gpt2.json)",
    )


def conv1d_to_linear(model) -> int:
    """GPT-2 keeps its projections in transformers' Conv1D; int8 kernels only replace nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], dtype=child.weight.dtype)
                lin.weight.data = child.weight.data.t().contiguous()
                lin.bias.data = child.bias.data
                setattr(mod, name, lin)
                n += 1
    return n


def quantize(model, method: str, skip=("lm_head",)):
    """int8 by config. torchao: quantize_ with its Int8 configs; torch_int8_dynamic: fbgemm/x86 dynamic int8."""
    if method in ("none", "bnb_int8"):  # bnb is applied at load time
        return model
    conv1d_to_linear(model)
    keep = lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn.split(".")[-1] not in skip  # noqa: E731
    if method == "torch_int8_dynamic":
        names = {n for n, m in model.named_modules() if keep(m, n)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
            # per-channel weight scales: same speed as per-tensor, closer to fp32 (MiniLM cosine 0.93 -> 0.97)
            return torch.ao.quantization.quantize_dynamic(
                model, {n: torch.ao.quantization.per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8
            )
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    cfg = {
        "torchao_int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "torchao_int8_weight_only": Int8WeightOnlyConfig,
    }[method]
    quantize_(model, cfg(), filter_fn=keep)
    return model


def _load_kwargs(args) -> dict:
    kw = {"dtype": DTYPES[args.dtype]}
    if args.quantization == "bnb_int8":
        from transformers import BitsAndBytesConfig

        kw.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto")
    return kw


def load_lm(args):
    """-> (model ready for inference, tokenizer). A ZeRO checkpoint dir is consolidated first."""
    from transformers import AutoModelForCausalLM

    from dsrecipes.train.data import load_tokenizer
    from dsrecipes.train.models import build_causal_lm

    path = args.model_name_or_path
    if is_zero_checkpoint(path):
        ckpt = resolve_zero_checkpoint(path)
        final_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "final")
        tok = load_tokenizer(args.tokenizer_name_or_path, final_dir if os.path.isdir(final_dir) else None)
        model = AutoModelForCausalLM.from_config(_zero_model_config(args, ckpt, tok))
        missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ConfigError(
                "<args>",
                "model_config",
                f"checkpoint does not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                "give the model JSON the run was trained with",
            )
        model.tie_weights()
        model.to(DTYPES[args.dtype])
    else:
        tok = load_tokenizer(args.tokenizer_name_or_path, path)
        model = build_causal_lm(args, tok, config_overrides=_load_kwargs(args))
    model.eval().requires_grad_(False)
    model = quantize(model, args.quantization)
    if args.engine == "deepspeed":
        model = _init_inference(model, args)
    return model, tok


def _init_inference(model, args):
    import deepspeed

    if args.tp_size > 1 and getattr(model.config, "model_type", "") == "gpt2":
        raise ConfigError(
            "<args>",
            "tp_size",
            "DeepSpeed AutoTP excludes GPT-2 (fused Conv1D qkv; its manual policy fails in 0.19.8)",
            "serve GPT-2 with tp_size: 1, or tensor-parallel a Llama-style model",
        )
    engine = deepspeed.init_inference(
        model,
        dtype=DTYPES[args.dtype],
        replace_with_kernel_inject=args.kernel_inject,
        tensor_parallel={"tp_size": args.tp_size},
    )
    if not torch.cuda.is_available():
        import deepspeed.comm.comm as ds_comm

        # The shared-memory all-reduce kernel segfaults on this AVX2 CPU: route TP all-reduces through gloo.
        if ds_comm.cdb is not None:
            ds_comm.cdb.shm_vector_kernel_level = 0
    return engine.module


def load_encoder(args):
    """A BERT-family encoder (AutoModel) + its tokenizer, for /v1/embeddings."""
    from transformers import AutoModel, AutoTokenizer

    path = args.embedding_model_name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, **_load_kwargs(args))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            "<args>",
            "embedding_model_name_or_path",
            f"cannot load {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
            "give a local encoder dir with config.json, weights and tokenizer",
        ) from None
    model.eval().requires_grad_(False)
    from dsrecipes.serve.embedding import quantize_encoder, read_pooling

    try:
        pooling = read_pooling(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(
            "<args>", "embedding_model_name_or_path", str(exc), "use a model with cls, mean or max pooling"
        ) from None
    if args.quantization == "torch_int8_dynamic":  # per-token activation scales: batch-invariant (pitfall 19)
        quantize_encoder(model)
    else:
        model = quantize(model, args.quantization)
    model.dsrecipes_pooling = pooling
    if os.path.isfile(
        os.path.join(path, "sentence_bert_config.json")
    ):  # texts truncate there, as in sentence-transformers
        tok.model_max_length, tok.dsrecipes_truncate = pooling["max_length"], True
    return model, tok


def embed(model, tok, inputs, max_length: int | None = None, normalize: bool | None = None):
    """Pooled (the model's sentence-transformers pooling, else mean), L2-normalised (likewise) last hidden states;
    inputs are strings or token-id lists. Batch-invariant: see dsrecipes.serve.embedding."""
    from dsrecipes.serve.embedding import embed as _embed

    return _embed(model, tok, inputs, max_length, normalize)


# ----------------------------------------------------------------------------- agreement (quantized vs reference)
@torch.inference_mode()
def top1_agreement(ref, model, sequences: list[list[int]], start: int = 1) -> float:
    """Fraction of positions >= start where both models' next-token argmax agree, fed the same sequences
    (teacher forcing, so one early disagreement does not count twice)."""
    same = total = 0
    for seq in sequences:
        ids = torch.tensor([seq])
        a, b = (
            ref(input_ids=ids).logits[0, start - 1 : -1].argmax(-1),
            model(input_ids=ids).logits[0, start - 1 : -1].argmax(-1),
        )
        same, total = same + int((a == b).sum()), total + a.numel()
    return same / max(total, 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
