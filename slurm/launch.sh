#!/usr/bin/env bash
# The one SLURM launcher behind slurm/*.sbatch: runs `accelerate launch --config_file A recipes/R.py --config C`
# (the Makefile's line) once per node through srun, and turns a preemption signal into checkpoint + requeue.
#
# Run (from inside an sbatch script; the wrappers slurm/{train,distill,pipeline,serve}.sbatch do this):
#     bash slurm/launch.sh --recipe train_lm --config configs/recipes/train_tiny_zero2.yaml \
#         [--accelerate-config configs/accelerate/deepspeed_cpu_2proc.yaml] [--deepspeed-config D.json] \
#         [--procs-per-node N] [--launcher accelerate|python] [--resume latest] [any recipe flag, e.g. --max_steps 30]
# Produces: whatever the recipe writes (its output_dir), and the launch lines in the job's log.
# Env overrides: PROCS_PER_NODE, THREADS_PER_PROC, DSR_MAIN_PORT, DSR_VENV (the virtualenv to activate, default .venv).
#
# Multi-node: srun starts ONE launcher per node (--ntasks-per-node=1); each task expands its own \$SLURM_NODEID
# as --machine_rank. --num_machines = $SLURM_NNODES, --num_processes = nodes x processes per node (GPUs per node,
# or 1 on CPU-only nodes), the main process runs on the first node of the allocation, and the port is derived
# from the job id so that two jobs sharing a node do not collide.
#
# Preemption: SLURM sends USR1 to this batch shell (`#SBATCH --signal=B:USR1@T`, or `scancel --signal=USR1
# --batch JOB`). The trap below forwards it to the job step's processes on every node; the launchers ignore it
# (`trap '' USR1` before exec) and the recipe's workers catch it, save a checkpoint at the next optimizer step and
# exit 0. Then this script requeues the job (`scontrol requeue`); the next run starts with --resume_from latest.
set -euo pipefail

# ---------------------------------------------------------------- arguments
RECIPE="" CONFIG="" ACCEL_CONFIG=configs/accelerate/deepspeed_cpu_2proc.yaml DS_CONFIG="" LAUNCHER=accelerate RESUME=""
PROCS_PER_NODE=${PROCS_PER_NODE:-}
PASS=()  # everything else goes to the recipe unchanged
while (($#)); do
    case $1 in
    --recipe) RECIPE=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --accelerate-config) ACCEL_CONFIG=$2; shift 2 ;;
    --deepspeed-config) DS_CONFIG=$2; shift 2 ;;
    --launcher) LAUNCHER=$2; shift 2 ;;
    --resume) RESUME=$2; shift 2 ;;
    --procs-per-node) PROCS_PER_NODE=$2; shift 2 ;;
    *) PASS+=("$1"); shift ;;
    esac
done

cd "${SLURM_SUBMIT_DIR:-.}"  # the repository: the nodes see it on a shared file system
fail() { echo "error: slurm/launch.sh: $1: $2; $3" >&2; exit 2; }
[[ -n ${SLURM_JOB_ID:-} ]] || fail "SLURM_JOB_ID" "not inside a SLURM job" "submit with sbatch slurm/<name>.sbatch"
[[ -f recipes/$RECIPE.py ]] || fail "--recipe" "recipes/$RECIPE.py not found" "pick one of: $(cd recipes && ls *.py | sed 's/\.py$//' | xargs)"
[[ -z $CONFIG || -f $CONFIG ]] || fail "--config" "$CONFIG not found" "pass a YAML from configs/recipes/"
[[ $LAUNCHER == python || -f $ACCEL_CONFIG ]] || fail "--accelerate-config" "$ACCEL_CONFIG not found" "pass a YAML from configs/accelerate/"
[[ -z $DS_CONFIG || -f $DS_CONFIG ]] || fail "--deepspeed-config" "$DS_CONFIG not found" "pass a JSON from configs/deepspeed/"

# ---------------------------------------------------------------- environment (site-specific)
# module load cuda/12.4                                 # EDIT: modules your site needs
source "${DSR_VENV:-.venv}/bin/activate"                # EDIT: or `conda activate ENV`
# export NCCL_SOCKET_IFNAME=ib0                         # EDIT: the interface between nodes, if NCCL picks a wrong one
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# ---------------------------------------------------------------- topology
NNODES=${SLURM_NNODES:-1}
GPUS=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
if [[ -z $PROCS_PER_NODE ]]; then
    PROCS_PER_NODE=$GPUS
    ((PROCS_PER_NODE > 0)) || PROCS_PER_NODE=1  # CPU-only nodes: one process per node
fi
# CPU threads per process (OMP_NUM_THREADS): this node's CPUs shared by its processes.
THREADS=${THREADS_PER_PROC:-$(( ${SLURM_CPUS_ON_NODE:-1} / PROCS_PER_NODE ))}
((THREADS > 0)) || THREADS=1
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# NodeAddr, not the node name: names need not resolve (the test cluster's n1/n2 do not).
MAIN_ADDR=$(scontrol show node "$MAIN_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
MAIN_ADDR=${MAIN_ADDR:-$MAIN_NODE}
MAIN_PORT=${DSR_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 12000))}  # below the ephemeral range; differs per job

RECIPE_ARGS=()
[[ -n $CONFIG ]] && RECIPE_ARGS+=(--config "$CONFIG")
[[ -n $RESUME ]] && RECIPE_ARGS+=(--resume_from "$RESUME")
RECIPE_ARGS+=("${PASS[@]}")

if [[ $LAUNCHER == accelerate ]]; then
    ARGS=(--config_file "$ACCEL_CONFIG" --num_cpu_threads_per_process "$THREADS"
        --num_machines "$NNODES" --num_processes $((NNODES * PROCS_PER_NODE))
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --same_network --rdzv_backend static
        --deepspeed_multinode_launcher standard  # torchrun on every node (only read with DeepSpeed configs)
        ${DS_CONFIG:+--deepspeed_config_file "$DS_CONFIG"}
        recipes/"$RECIPE".py "${RECIPE_ARGS[@]}")
    # \$SLURM_NODEID is escaped: each srun task expands its own node id (0 on the first node, 1 on the next, ...).
    TASK_CMD="trap '' USR1; exec accelerate launch --machine_rank \$SLURM_NODEID $(printf '%q ' "${ARGS[@]}")"
else  # one plain process on the first node (serving)
    TASK_CMD="trap '' USR1; exec python $(printf '%q ' recipes/"$RECIPE".py "${RECIPE_ARGS[@]}")"
fi

echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NNODES node(s) x $PROCS_PER_NODE process(es) x $THREADS thread(s), main $MAIN_ADDR:$MAIN_PORT"
echo "[slurm] each node runs: $TASK_CMD"

# ---------------------------------------------------------------- run, forwarding USR1 to the workers
PREEMPTED=0
on_usr1() {
    PREEMPTED=1
    printf '\n[slurm] USR1: asking the workers to checkpoint at the next step and exit\n'  # \n: after progress bars
    scancel --signal=USR1 "$SLURM_JOB_ID" || true  # all steps on all nodes, not this batch shell
}
trap on_usr1 USR1
# srun in the background: bash runs a trap only between commands, and `wait` returns when a signal arrives.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=60 bash -c "$TASK_CMD" &
SRUN_PID=$!
while :; do
    rc=0
    wait "$SRUN_PID" || rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # srun ended; otherwise a trap interrupted `wait`: keep waiting
done
trap - USR1

if ((PREEMPTED && rc == 0)); then
    echo "[slurm] checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[slurm] srun exited with $rc"
exit "$rc"
