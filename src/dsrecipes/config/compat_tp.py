"""The AutoTP cells of the composition table: TP x ZeRO stage, and TP with the other techniques, each one works (the
test that ran it), refused (the rule id of dsrecipes.config.rules_tp, or the start-up check of
dsrecipes.parallel.tensor.check_model), ran once by hand (no test yet: the command and what it gave), or GPU only.

    rows = tp_rows()      # [(label, kind, text)], kind in works | refused | ran | gpu
    lines = tp_md()       # the markdown section for docs/compat.md (config/compat_doc.py wires it in)
"""

from __future__ import annotations

from dsrecipes.config import rules

TP_TEST = "tests/test_tensor_parallel.py"
_Z1, _Z3, _QWEN, _FINAL, _RESUME, _BYTES, _GPT2 = (
    "test_tp2_zero1_loss_curve_and_data_match_data_parallel",
    "test_zero3_with_tp2_matches_data_parallel",
    "test_zero2_tp2_qwen2_frozen_checkpointed_matches_one_process",
    "test_final_is_whole_loads_with_from_pretrained_and_gives_the_eval_loss",
    "test_resume_with_tp2_is_exact",
    "test_state_bytes_halve_for_the_sharded_linear_layers",
    "test_gpt2_with_tp_stops_at_start_with_one_line",
)
# Ran by hand with tiny_llama (8 steps, the tests' tiny_run flags), 2026-12-01; no test runs them yet.
_BY_HAND = "ran by hand on CPU (tiny Llama, the tests' short run), no test yet: "
# (row label, the settings besides tp=2 on 2 processes, the test that ran it / a by-hand note / None, GPU only)
TP_ROWS: list[tuple[str, dict, str | None, bool]] = [
    ("ZeRO-0", {"zero": 0}, _BY_HAND + "2 processes, loss curve within 1e-7 of data parallel", False),
    ("ZeRO-1", {"zero": 1}, _Z1, False),
    ("ZeRO-2 (Qwen2, one KV head)", {"zero": 2}, _QWEN, False),
    ("ZeRO-3 (zero3_tp2.json: no train_batch_size)", {"zero": 3}, _Z3, False),
    (
        "ZeRO-2 offload (DeepSpeedCPUAdam)",
        {"zero": 2, "offload": "cpu"},
        _BY_HAND + "2 processes, curve within 1e-7 of data parallel",
        False,
    ),
    (
        "ZeRO-3 offload (parameters and optimizer)",
        {"zero": 3, "offload": "cpu", "offload_param": "cpu"},
        _BY_HAND + "2 processes, no train_batch_size, curve within 1e-7 of data parallel",
        False,
    ),
    ("ZeRO-3 NVMe offload", {"zero": 3, "offload": "nvme", "offload_param": "nvme"}, None, True),
    ("export to final/ (gathered)", {"zero": 1}, _FINAL, False),
    ("checkpoint + exact resume", {"zero": 1}, _RESUME, False),
    ("per-rank state bytes", {"zero": 1}, _BYTES, False),
    ("HF full checkpointing", {"zero": 2, "checkpointing": "hf_full"}, _QWEN, False),
    ("static freeze", {"zero": 2, "freeze": "static"}, _QWEN, False),
    (
        "progressive freeze + memory cache",
        {"zero": 1, "freeze": "progressive", "cache": "memory"},
        _BY_HAND + "2 processes, 10 steps, 3 engine rebuilds, curve within 1.2e-7 of data parallel",
        False,
    ),
    (
        "bnb 8-bit AdamW",
        {"zero": 1, "optimizer": "adamw_8bit"},
        _BY_HAND + "2 processes, completes, loss 5.50 -> 3.51",
        False,
    ),
    (
        "torchao 8-bit, ZeRO-0",
        {"zero": 0, "optimizer": "torchao_adamw_8bit"},
        _BY_HAND + "2 processes, completes, curve within 2e-5 of fp32 AdamW data parallel",
        False,
    ),
    ("LoRA", {"zero": 1, "lora": "lora"}, None, False),
    ("pipeline recipe", {"zero": 1, "recipe": "pipeline"}, None, False),
    (
        "distillation recipe (TP student, plain teacher)",
        {"zero": 1, "recipe": "distill"},
        _BY_HAND + "2 processes, Llama 4 -> 2 layers, curve within 1.4e-7 of data parallel, the same eval loss",
        False,
    ),
    ("Ulysses SP (sp=2, 4 processes)", {"zero": 1, "sp": 2, "world": 4}, None, False),
    (
        "4 processes: 2 data-parallel x 2 TP",
        {"zero": 1, "world": 4},
        _BY_HAND + "4 processes, curve within 1e-7 of dp=2, the same data fingerprint",
        False,
    ),
    ("3 processes", {"zero": 1, "world": 3}, None, False),
    ("GPT-2 (Conv1D)", {"zero": 1}, _GPT2, False),
]


def tp_rows() -> list[tuple[str, str, str]]:
    """(label, kind, text) per TP row: refused (the rule), works (the test), ran (by hand), gpu, or allowed."""
    out = []
    for label, fields, test, gpu_only in TP_ROWS:
        s = rules.Settings(**{"device": "cpu", "tp": 2, "world": 2, **fields})
        refused = rules.fired(s, refused=True)
        if refused:
            out.append((label, "refused", "; ".join(f"{r.text(s)} [{r.id}]" for r in refused)))
        elif test == _GPT2:
            out.append((label, "refused", f"at start-up: parallel.tensor.check_model (`{TP_TEST}::{test}`)"))
        elif gpu_only:
            out.append((label, "gpu", "needs a GPU machine with NVMe (configs/deepspeed/zero3_nvme.json)"))
        elif test and test.startswith(_BY_HAND):
            out.append((label, "ran", test))
        elif test:
            out.append((label, "works", f"`{TP_TEST}::{test}`"))
        else:
            out.append((label, "allowed", "no rule refuses it; not run with tensor_parallel yet"))
    return out


def tp_md() -> list[str]:
    lines = ["", "## AutoTP training (tensor_parallel.autotp_size = 2)", "", "| TP with | |", "|---|---|"]
    marks = {
        "works": "**works** ",
        "refused": "**refused**: ",
        "ran": "**works, not in tests**: ",
        "gpu": "**GPU only**: ",
        "allowed": "**allowed, not run**: ",
    }
    for label, kind, text in tp_rows():
        lines.append(f"| {label} | {marks[kind]}{text.replace('|', '/')} |")
    return lines
