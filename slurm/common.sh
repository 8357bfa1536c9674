# Sourced by the sbatch scripts: site settings and the paths every job uses.
GLOWLAB_CLUSTER_ENV="${GLOWLAB_CLUSTER_ENV:-${SLURM_SUBMIT_DIR:-.}/slurm/cluster.env}"
# shellcheck disable=SC1090
[ -f "$GLOWLAB_CLUSTER_ENV" ] && . "$GLOWLAB_CLUSTER_ENV"
PYTHON="${GLOWLAB_PYTHON:-python3}"
OUTPUT_ROOT="${GLOWLAB_OUTPUT_ROOT:-${SLURM_SUBMIT_DIR:-.}/runs}"
JOB_ID="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?run this script with sbatch}}"
# sbatch hands the job the submitting shell's environment. Process-group variables from a launcher
# there (torchrun, an interactive DDP session) would make Lightning ignore SLURM's layout and the
# tasks wait for peers that never come: the job's own srun tasks define them.
unset MASTER_ADDR MASTER_PORT RANK LOCAL_RANK WORLD_SIZE NODE_RANK GROUP_RANK LOCAL_WORLD_SIZE \
  TORCHELASTIC_RUN_ID 2>/dev/null || true
# One thread per task for BLAS/OpenMP unless the site asked for more CPUs per task.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"
cd "${SLURM_SUBMIT_DIR:-.}"
