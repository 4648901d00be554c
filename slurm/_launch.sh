# Common body of every slurm/<stage>.sbatch (sourced, with RECIPE and optionally SINGLE_PROCESS=1 set): one `srun`
# task per node, each running torchrun with a c10d rendezvous on the job's first node, so N nodes x P processes
# form one process group.
# The recipe's Hydra overrides are the sbatch script's arguments ("$@"), passed through unchanged.
#
# Settings (environment variables; sbatch exports the submitting shell's environment):
#   STEERLM_ROOT            the repository (default: the directory sbatch was run from)
#   STEERLM_PYTHON          the interpreter (default: $STEERLM_ROOT/.venv/bin/python)
#   STEERLM_NPROC_PER_NODE  processes per node (default: the node's GPUs: SLURM_GPUS_ON_NODE or
#                           CUDA_VISIBLE_DEVICES, else 1; on CPU nodes set it, e.g. 2: gloo, one process per rank)
#   STEERLM_RDZV_PORT       the rendezvous port on the first node (default: one the OS reports free there)
#   STEERLM_MAX_RESTARTS    torchrun worker-group restarts (default 0: a failed rank fails the job)
set -euo pipefail

: "${RECIPE:?RECIPE is set by slurm/<stage>.sbatch before sourcing slurm/_launch.sh}"
ROOT=${STEERLM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $ROOT/recipes/$RECIPE.py ]]; then
  echo "steerlm: $ROOT/recipes/$RECIPE.py not found: run sbatch from the repository root or set STEERLM_ROOT" >&2
  exit 2
fi
cd "$ROOT"
PYTHON=${STEERLM_PYTHON:-$ROOT/.venv/bin/python}
if ! command -v "$PYTHON" > /dev/null; then
  echo "steerlm: no Python at $PYTHON: run scripts/setup.sh in $ROOT or set STEERLM_PYTHON" >&2
  exit 2
fi

NPROC=${STEERLM_NPROC_PER_NODE:-}
if [[ -z $NPROC ]]; then
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    NPROC=$SLURM_GPUS_ON_NODE
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "NoDevFiles" ]]; then
    IFS=, read -ra _devs <<< "$CUDA_VISIBLE_DEVICES"
    NPROC=${#_devs[@]}
  else
    NPROC=1
  fi
fi
NNODES=${SLURM_JOB_NUM_NODES:-1}
if [[ ${SINGLE_PROCESS:-0} == 1 ]]; then      # evaluate, train_steerlm2, train_ppo: one process, one device
  if (( NNODES != 1 )); then
    echo "steerlm: recipes/$RECIPE.py runs as one process: submit it with --nodes=1" >&2
    exit 2
  fi
  NPROC=1                                     # STEERLM_NPROC_PER_NODE does not apply
fi
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the batch script runs on the first node: a port the OS reports free there (not job-id arithmetic, which collides)
PORT=${STEERLM_RDZV_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

echo "steerlm: job $SLURM_JOB_ID recipe=$RECIPE nodes=$NNODES nproc_per_node=$NPROC" \
     "world_size=$((NNODES * NPROC)) rdzv=$HEAD:$PORT python=$PYTHON"
echo "steerlm: overrides: $*"

# One task per node, owning all of the node's allocated CPUs (srun does not inherit --cpus-per-task in 22.05+;
# the job's CPUs come from sbatch --cpus-per-task or --exclusive: without either, all ranks may share one core).
# torchrun then starts NPROC workers on each node; RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR come from the rendezvous.
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
     --kill-on-bad-exit=1 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts="${STEERLM_MAX_RESTARTS:-0}" \
    "recipes/$RECIPE.py" "$@"
