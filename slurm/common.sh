# Sourced by every template in slurm/ after its #SBATCH header. Submit from the repository root.
set -euo pipefail
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}     # torch would otherwise start a thread per core of the node
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}  # srun of Slurm 22.05-23.02 does not inherit --cpus-per-task
# a task that fails ends the whole srun step at once: its DDP peers would otherwise wait in their next collective
# (NCCL: until its 30-minute timeout; a stuck rank: until the time limit), holding every GPU of the job
export SLURM_KILL_BAD_EXIT=1
export DATA_DIR=${DATA_DIR:-$PWD/data}               # fetched ahead on a login node: python -m datamodules.download

# STAGE_DATA=1 copies $DATA_DIR to node-local disk (once per node) and reads it from there
if [[ ${STAGE_DATA:-0} == 1 ]]; then
  staged=${TMPDIR:-/tmp}/data-$SLURM_JOB_ID
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 bash -c "mkdir -p '$staged' && cp -r '$DATA_DIR'/. '$staged'"
  trap 'rm -rf "$staged"' EXIT  # the batch node's copy; clusters clean TMPDIR of the others
  DATA_DIR=$staged
fi
DATA_ARGS=(--data.init_args.data_dir "$DATA_DIR")

echo "$(date '+%F %T') job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID} on" \
     "$SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}, data in $DATA_DIR"

# a sweep's array task (python sweep.py SWEEP --slurm TEMPLATE exports SWEEP_POINTS): line $SLURM_ARRAY_TASK_ID of
# that file is `<subcommand> --config <base> [--config overlay] [overrides] [--ckpt_path last.ckpt]`; it becomes
# $SUBCOMMAND and the template's arguments, `<base> [--config overlay] [overrides]`, as if given to sbatch
if [[ -n ${SWEEP_POINTS:-} ]]; then
  line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SWEEP_POINTS")
  if [[ -z $line ]]; then
    echo "error: array task $SLURM_ARRAY_TASK_ID has no line in $SWEEP_POINTS; resubmit with python sweep.py" >&2
    exit 2
  fi
  eval "POINT=($line)"  # sweep.py writes each line with shlex.join: shell quoting
  if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && [[ ${POINT[-2]:-} == --ckpt_path ]]; then
    POINT=("${POINT[@]:0:${#POINT[@]}-2}")  # requeued: Lightning resumes from the newer hpc_ckpt_N.ckpt
  fi
  SUBCOMMAND=${POINT[0]}
  set -- "${POINT[@]:2}"
fi
