"""The AutoTP cells of the composition table: TP x ZeRO stage, and TP with the other techniques, each one works (the
test that runs it: tests/test_tensor_parallel.py, or tests/test_tensor_parallel_rows.py for the rows that need a launch
of their own), refused (the rule id of dsrecipes.config.rules_tp, or the start-up check of
dsrecipes.parallel.tensor.check_model), GPU only, or allowed but not run.

    rows = tp_rows()      # [(label, kind, text)], kind in works | refused | gpu | allowed
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
ROWS_TEST = "tests/test_tensor_parallel_rows.py"  # its tests are named with the file: ROWS_TEST::name
_Z0_TORCHAO, _OFF2, _OFF3, _BNB, _FREEZE_W4, _DISTILL = (
    f"{ROWS_TEST}::{name}"
    for name in (
        "test_zero0_with_torchao_8bit_adamw_tracks_data_parallel",
        "test_zero2_offload_matches_data_parallel",
        "test_zero3_offload_of_parameters_and_optimizer_matches_data_parallel",
        "test_bnb_8bit_adamw_zero1_tracks_data_parallel",
        "test_four_processes_2dp_x_2tp_with_progressive_freeze_and_cache_match_data_parallel",
        "test_distill_with_tp_student_matches_data_parallel",
    )
)
_W4_FREEZE = {"zero": 1, "world": 4, "freeze": "progressive", "cache": "memory"}
# (row label, the settings besides tp=2 (on 2 processes unless world says), the test that runs it / None, GPU only)
TP_ROWS: list[tuple[str, dict, str | None, bool]] = [
    ("ZeRO-0 (run with torchao 8-bit AdamW)", {"zero": 0}, _Z0_TORCHAO, False),
    ("ZeRO-1", {"zero": 1}, _Z1, False),
    ("ZeRO-2 (Qwen2, one KV head)", {"zero": 2}, _QWEN, False),
    ("ZeRO-3 (zero3_tp2.json: no train_batch_size)", {"zero": 3}, _Z3, False),
    ("ZeRO-2 offload (DeepSpeedCPUAdam)", {"zero": 2, "offload": "cpu"}, _OFF2, False),
    (
        "ZeRO-3 offload (parameters and optimizer)",
        {"zero": 3, "offload": "cpu", "offload_param": "cpu"},
        _OFF3,
        False,
    ),
    ("ZeRO-3 NVMe offload", {"zero": 3, "offload": "nvme", "offload_param": "nvme"}, None, True),
    ("export to final/ (gathered)", {"zero": 1}, _FINAL, False),
    ("checkpoint + exact resume", {"zero": 1}, _RESUME, False),
    ("per-rank state bytes", {"zero": 1}, _BYTES, False),
    ("HF full checkpointing", {"zero": 2, "checkpointing": "hf_full"}, _QWEN, False),
    ("static freeze", {"zero": 2, "freeze": "static"}, _QWEN, False),
    ("progressive freeze + memory cache (4 processes: 2 dp x 2 TP)", _W4_FREEZE, _FREEZE_W4, False),
    ("bnb 8-bit AdamW", {"zero": 1, "optimizer": "adamw_8bit"}, _BNB, False),
    ("torchao 8-bit, ZeRO-0", {"zero": 0, "optimizer": "torchao_adamw_8bit"}, _Z0_TORCHAO, False),
    ("LoRA", {"zero": 1, "lora": "lora"}, None, False),
    ("pipeline recipe", {"zero": 1, "recipe": "pipeline"}, None, False),
    ("distillation recipe (TP student, plain teacher)", {"zero": 1, "recipe": "distill"}, _DISTILL, False),
    ("Ulysses SP (sp=2, 4 processes)", {"zero": 1, "sp": 2, "world": 4}, None, False),
    ("4 processes: 2 data-parallel x 2 TP (with progressive freeze + memory cache)", _W4_FREEZE, _FREEZE_W4, False),
    ("3 processes", {"zero": 1, "world": 3}, None, False),
    ("GPT-2 (Conv1D)", {"zero": 1}, _GPT2, False),
]


def tp_rows() -> list[tuple[str, str, str]]:
    """(label, kind, text) per TP row: refused (the rule), works (the test), gpu, or allowed (no rule, no test)."""
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
        elif test:
            ref = test if "::" in test else f"{TP_TEST}::{test}"
            out.append((label, "works", f"`{ref}`"))
        else:
            out.append((label, "allowed", "no rule refuses it; not run with tensor_parallel yet"))
    return out


def tp_md() -> list[str]:
    from dsrecipes.config.compat_doc import rows_md  # compat_doc imports this module inside render()

    return rows_md("AutoTP training (tensor_parallel.autotp_size = 2)", "TP with", tp_rows())
