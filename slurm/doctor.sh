#!/bin/bash
# distrain doctor on every node of an allocation: each node's GPUs, CUDA, cuDNN, NCCL and memory
# growth, whether its GPUs train the numbers of one GPU in float32, mixed_float16 and mixed_bfloat16,
# and its images/s per precision and with XLA (docs/doctor.md). One task per node, all GPUs of it.
#
# Run from the distrain checkout or any other directory (every node must see distrain):
#   sbatch slurm/doctor.sh                                  one node, 1 GPU
#   sbatch --nodes=4 --gres=gpu:8 slurm/doctor.sh           4 nodes, all 8 GPUs of each
#   DISTRAIN=$PWD/.venv/bin/distrain sbatch slurm/doctor.sh a distrain not on PATH
#   distrain doctor                                         this machine, no SLURM
# Output: slurm-distrain-doctor-<job id>.out: each node's table, every line prefixed with the task
# number by srun (task N ran on the Nth node of `scontrol show hostnames`; the table's first line
# names its host). The job exits 0 when every node passed, 1 when a node failed a check (that
# node's last line names the check) or sees no GPU.
#SBATCH --job-name=distrain-doctor
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --exclusive
#SBATCH --time=00:15:00
##SBATCH --partition=PARTITION
##SBATCH --account=ACCOUNT
#SBATCH --output=slurm-%x-%j.out

# Settings.
DISTRAIN=${DISTRAIN:-distrain}  # the distrain command on every node
ARGS=(--require-gpu)  # doctor's options on every node, e.g. (--require-gpu --steps 100); without
                      # --require-gpu a node whose GPUs TensorFlow cannot see passes (CPU part only)

set -uo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "doctor.sh: not inside a SLURM job; run: sbatch slurm/doctor.sh (or distrain doctor on one machine)" >&2
  exit 2
fi
echo "distrain doctor on ${SLURM_JOB_NUM_NODES:-1} node(s): ${SLURM_JOB_NODELIST:-?}"
# One task per node (--exclusive above gives it the whole node, so the speeds are not shared);
# --kill-on-bad-exit=0: a node that fails a check does not stop the others' tables.
srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=0 --label \
  "$DISTRAIN" doctor "${ARGS[@]}"
status=$?
if [[ $status -eq 0 ]]; then
  echo "distrain doctor: every node passed"
else
  echo "distrain doctor: a node failed (exit $status): see its last line above" >&2
fi
exit $status
