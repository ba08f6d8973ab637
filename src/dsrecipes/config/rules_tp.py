"""The rule table's refusals for AutoTP training (axis tp: the DeepSpeed JSON's tensor_parallel.autotp_size).

Part of the one table in dsrecipes.config.rules (which imports TP_RULES); each Rule names its axes, its one-line
problem and fix, the config key it names, and the upstream issue it guards against. What needs the model or keys
the table has no axis for (GPT-2's Conv1D, a vocabulary-sharded head, ZeRO-3 with train_batch_size set) is refused
at start-up by dsrecipes.parallel.tensor.check_model. Every TP cell, and the test that ran it or the rule that
refuses it: dsrecipes.config.compat_tp; the tests: tests/test_tensor_parallel.py.
"""

from __future__ import annotations


def _rules():
    from dsrecipes.config.rules import Not, Rule

    tp_on = Not((1,))
    return (
        Rule(
            "tp_divides_world",
            {"tp": tp_on, "recipe": Not(("pipeline",))},
            "autotp_size {tp} must divide the number of processes ({world}): DeepSpeed lays the ranks out as "
            "(data parallel, tensor parallel) groups of {tp}",
            "launch a multiple of {tp} processes (--num_processes), or pick an autotp_size that divides it",
            key="tensor_parallel.autotp_size",
            file="deepspeed",
            when=lambda s: s.world is not None and s.world % s.tp != 0,
        ),
        Rule(
            "tp_pipeline",
            {"tp": tp_on, "recipe": frozenset(("pipeline",))},
            "AutoTP is not wired into recipes/train_pipeline.py: its stages are DeepSpeed PipelineModule layers "
            "(dsrecipes.pipeline.layers), not the Hugging Face model whose tp_plan AutoTP shards",
            "use recipes/train_lm.py with tensor_parallel, or the pipeline with configs/deepspeed/zero1.json",
            key="tensor_parallel.autotp_size",
            file="deepspeed",
            components=("pipeline",),
        ),
        Rule(
            "tp_lora",
            {"tp": tp_on, "lora": frozenset(("lora", "qlora"))},
            "LoRA with AutoTP fails in deepspeed.initialize: AutoTP replaces the Linear layers peft wrapped, and "
            "ZeRO's parameter mapping no longer finds the adapter's parameters (KeyError: Parameter containing ...)",
            "train LoRA without tensor_parallel (configs/deepspeed/zero2.json), or TP without lora_r",
            key="lora_r",
        ),
    )


TP_RULES: tuple = _rules()
