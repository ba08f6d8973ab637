"""The rule table's refusals for Ulysses sequence parallelism and ALST tiling (axes sp, tiling, reduce_scatter).

Part of the one table in dsrecipes.config.rules (which imports SP_RULES); each Rule names its axes, its one-line
problem and fix, the config key it names, and the upstream issue it guards against. What works is measured in
tests/test_sequence_parallel.py; config/compat_sp.py lists every SP x ZeRO x checkpointing x tiling cell.

Known DeepSpeed bugs checked on 0.19.8 instead of refused: ZeRO stage 0 with SP (#7833) works, fp32 and bf16
(parallel_state_sp aliases the model-parallel rank the stage-0 optimizers ask for; test_sp2_cells_match_sp1
[zero0_bf16]); sp_size < world size (#7672, the backward of torch's differentiable all_gather indexing by the global
rank) does not arise: the loss is summed over the SP group by an all-reduce whose backward is an all-reduce
(parallel/sequence._GroupSum; test_sp2_with_data_parallel). Resuming on another SP layout (#8226) is refused by
parallel/sequence.check_resume, the same layout resumes exactly. Gradient scale under SP (#5248, #5555): ZeRO 0-2
sum the SP ranks' gradients, ZeRO-3's reduce-scatter averages them; sequence_loss scales its backward to the engine
(dsrecipes.compat.sp_gradient_scale). ZeRO-3 with the DeepSpeed JSON's zero_optimization.reduce_scatter: false does
both, bucket by bucket, and ZeRO-3 + selective_ops + tiled_loss fails in backward: both are refused here (axes
reduce_scatter, checkpointing, tiling), by `dsrecipes check` and the recipes' start-up check, before anything trains.
Every cell the rules here allow trains with the sp=1 losses and gradients: tests/test_sequence_parallel_cells.py.
"""

from __future__ import annotations


def _rules():
    from dsrecipes.config.rules import Not, Rule

    sp_on = Not((1,))
    return (
        Rule(
            "sp_needs_deepspeed",
            {"sp": sp_on, "zero": frozenset((None,))},
            "sequence_parallel_size {sp} needs DeepSpeed: Ulysses attention, its groups and its data adapter come "
            "from DeepSpeed through accelerate's ParallelismConfig(sp_backend='deepspeed')",
            "launch with a DeepSpeed accelerate config (configs/accelerate/deepspeed_cpu_2proc.yaml, ZeRO 1-3), or "
            "set sequence_parallel_size: 1",
            key="sequence_parallel_size",
            when=lambda s: s.world is not None,  # known launch (accelerate YAML or a run); a lone recipe may be either
        ),
        Rule(
            "sp_divides_world",
            {"sp": sp_on},
            "sequence_parallel_size {sp} must divide the number of processes ({world}): the ranks form groups of "
            "{sp}, each splitting one sequence",
            "launch a multiple of {sp} processes (--num_processes), or pick a sequence_parallel_size that divides it",
            key="sequence_parallel_size",
            when=lambda s: s.world is not None and (s.world < s.sp or s.world % s.sp != 0),
        ),
        Rule(
            "tiling_ddp",
            {"tiling": Not(("none",)), "zero": frozenset((None,))},
            "ALST tiling runs one backward pass per tile inside the main one, made safe for ZeRO's gradient hooks "
            "(ds_grad_is_ready) but not for DDP's reducer, which marks each parameter ready once per backward",
            "run tiling under DeepSpeed (ZeRO 1-3, configs/accelerate/deepspeed_cpu_2proc.yaml) or on one process",
            key="tiled_mlp",
            when=lambda s: s.world is not None and s.world > 1,
        ),
        Rule(
            "sp_with_tp",
            {"sp": sp_on, "tp": Not((1,))},
            "Ulysses sequence parallelism and AutoTP training each bring their own DeepSpeed process groups (one mpu "
            "per engine); the two are not combined",
            "use sequence_parallel_size: 1 with tensor_parallel.autotp_size, or drop autotp_size",
            key="sequence_parallel_size",
        ),
        Rule(
            "sp_zero3_reduce_scatter_off",
            {"sp": sp_on, "zero": frozenset((3,)), "reduce_scatter": frozenset((False,))},
            "false with sequence_parallel_size {sp}: ZeRO-3 then sums the SP ranks' gradients in its contiguous "
            "buckets and averages them in the others (DeepSpeed #5248), so no loss scale gives the true gradient",
            "leave reduce_scatter at its default (true) under sequence parallelism, or set sequence_parallel_size: 1",
            key="zero_optimization.reduce_scatter",
            file="deepspeed",
            issue="deepspeedai/DeepSpeed#5248",
        ),
        Rule(
            "sp_zero3_selective_ops_tiled_loss",
            {
                "sp": sp_on,
                "zero": frozenset((3,)),
                "checkpointing": frozenset(("selective_ops",)),
                "tiling": frozenset(("loss", "mlp+loss")),
            },
            "selective_ops with ZeRO-3, tiled_loss and sequence_parallel_size {sp}: torch's selective checkpointing "
            "replays each block's ops in backward and needs the same ones, but ZeRO-3's parameter all-gathers there "
            "differ from the forward's (RuntimeError: c10d._allgather_base_ invocation index N encountered during "
            "backward but not found in storage; no upstream issue found)",
            "use gradient_checkpointing: full or layer_selective, tiled_loss: false, or ZeRO 0-2",
            key="gradient_checkpointing",
        ),
        Rule(
            "sp_prefix_cache",
            {"sp": sp_on, "cache": frozenset(("memory", "disk"))},
            "the frozen-prefix cache keys a block's output by the rank's own tokens, but under sequence parallelism "
            "that output also depends on the other shards of the sequence (attention across the SP group)",
            "set freeze_cache: none (static freezing alone works with sequence parallelism)",
            key="freeze_cache",
        ),
        Rule(
            "tiling_prefix_cache",
            {"tiling": Not(("none",)), "cache": frozenset(("memory", "disk"))},
            "tiled_loss runs the decoder and the head itself and tiled_mlp re-runs each MLP in backward, around the "
            "frozen-prefix cache's replaced forward",
            "set freeze_cache: none, or tiled_mlp: false and tiled_loss: false",
            key="freeze_cache",
        ),
    )


SP_RULES: tuple = _rules()
