# Sourced by the sbatch scripts: site settings and the paths every job uses.
GLOWLAB_CLUSTER_ENV="${GLOWLAB_CLUSTER_ENV:-${SLURM_SUBMIT_DIR:-.}/slurm/cluster.env}"
# shellcheck disable=SC1090
[ -f "$GLOWLAB_CLUSTER_ENV" ] && . "$GLOWLAB_CLUSTER_ENV"
PYTHON="${GLOWLAB_PYTHON:-python3}"
OUTPUT_ROOT="${GLOWLAB_OUTPUT_ROOT:-${SLURM_SUBMIT_DIR:-.}/runs}"
JOB_ID="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?run this script with sbatch}}"
# One thread per task for BLAS/OpenMP unless the site asked for more CPUs per task.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"
cd "${SLURM_SUBMIT_DIR:-.}"
