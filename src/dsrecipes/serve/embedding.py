"""Embeddings that do not depend on the batch: per-token int8 linears, length buckets, and the pooling of the
model's sentence-transformers config.

    quantize_encoder(model)                      # nn.Linear -> RowInt8Linear (int8 weights per channel, int8
                                                 # activations with one scale per token row; torch._int_mm)
    pooling = read_pooling(path)                 # {"mode": "mean"|"cls"|"max", "normalize": bool, "max_length"}
    vectors, n_tokens = embed(model, tok, ["a text"], pooling=pooling)

Batch invariance: a per-tensor activation scale lets a loud batch mate change everyone's rounding (pitfall 19);
one scale per token row does not, and the int32 matmul is exact. The rest of the forward is fp32, whose results
still shift by ~1e-6 with the padded width, and int8 rounding amplifies such shifts; so every input runs padded
to its own length bucket (a multiple of BUCKET), whatever else is in the batch. Used by dsrecipes.serve.loading.
"""

from __future__ import annotations

import json
import os

import torch

BUCKET = 16
DEFAULT_POOLING = {"mode": "mean", "normalize": True, "max_length": 512}


class RowInt8Linear(torch.nn.Module):
    """y = (round(x / sx) @ round(W / sw).T) * sx * sw + b with sx per row of x (token) and sw per output channel."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("qweight_t", (w / scale).round().clamp(-127, 127).to(torch.int8).t().contiguous())
        self.register_buffer("wscale", scale.t().contiguous())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).float()
        xs = x.abs().amax(1, keepdim=True).clamp_(min=1e-8).div_(127)
        xq = x.div(xs).round_().clamp_(-127, 127).to(torch.int8)  # in place: each pass costs as much as the matmul
        n = xq.shape[0]
        if xq.is_cuda and n <= 16:  # CUDA's _int_mm wants > 16 rows: pad (rows stay independent)
            xq = torch.cat([xq, xq.new_zeros(17 - n, xq.shape[1])])
        y = torch._int_mm(xq, self.qweight_t)[:n].float().mul_(xs)
        y = torch.addcmul(self.bias, y, self.wscale) if self.bias is not None else y.mul_(self.wscale)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)


def quantize_encoder(model, skip=("pooler",)) -> int:
    """Every nn.Linear (except names in skip) -> RowInt8Linear, in place; -> how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not any(s in full.split(".") for s in skip):
                setattr(mod, child_name, RowInt8Linear(child))
                n += 1
    return n


def read_pooling(path: str) -> dict:
    """Pooling, normalisation and max length from a sentence-transformers model dir (modules.json,
    1_Pooling/config.json, sentence_bert_config.json); DEFAULT_POOLING where they are absent."""
    out = dict(DEFAULT_POOLING)
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return out
    with open(modules_file) as fh:
        modules = json.load(fh)
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    out["normalize"] = "Normalize" in kinds
    if "Pooling" in kinds:
        with open(os.path.join(path, kinds["Pooling"], "config.json")) as fh:
            cfg = json.load(fh)
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens") if cfg.get(f"pooling_mode_{m}")]
        unsupported = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k[13:] not in modes]
        if len(modes) != 1 or unsupported:
            raise ValueError(f"{path}: pooling {cfg} is not one of cls / mean / max")
        out["mode"] = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[modes[0]]
    bert_cfg = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(bert_cfg):
        with open(bert_cfg) as fh:
            out["max_length"] = int(json.load(fh).get("max_seq_length") or out["max_length"])
    return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@torch.inference_mode()
def embed(model, tok, inputs, max_length: int | None = None, normalize: bool | None = None, pooling=None):
    """Pooled last hidden states (pooling: read_pooling's dict, else the model's `dsrecipes_pooling`, else mean +
    L2-normalised); inputs are strings or token-id lists. -> (vectors [n, dim], tokens counted)."""
    cfg = dict(pooling or getattr(model, "dsrecipes_pooling", None) or DEFAULT_POOLING)
    max_length = max_length or cfg["max_length"]
    normalize = cfg["normalize"] if normalize is None else normalize
    rows = [x if isinstance(x, list) else tok(x, truncation=True, max_length=max_length)["input_ids"] for x in inputs]
    pad = tok.pad_token_id or 0
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(-(-len(r) // BUCKET) * BUCKET, []).append(i)
    out = [None] * len(rows)
    for width, idx in groups.items():
        ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in idx])
        mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in idx])
        dev = getattr(model, "device", torch.device("cpu"))
        hidden = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float().cpu()
        vec = pool(hidden, mask, cfg["mode"])
        vec = torch.nn.functional.normalize(vec, dim=-1) if normalize else vec
        for j, i in enumerate(idx):
            out[i] = vec[j]
    return torch.stack(out), sum(len(r) for r in rows)
