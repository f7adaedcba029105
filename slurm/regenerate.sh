#!/usr/bin/env bash
# Rewrites the shipped sbatch scripts slurm/<job>.sh as renders of jobs/<job>.yaml (their header
# names the exact command). Run it after changing distrain/launch/slurm.py or a job's layout here.
#
#   slurm/regenerate.sh            rewrite slurm/mlp.sh, cnn.sh, residual.sh, inception.sh, mobilenet.sh
#   slurm/regenerate.sh --check    write nothing; exit 1 if one of them is out of date
#   DISTRAIN=.venv/bin/distrain slurm/regenerate.sh     with a distrain that is not on PATH
#
# Exit codes: 0 written (or up to date), 1 out of date (--check) or a render failed, 2 bad usage.
set -euo pipefail

cd "$(dirname "$0")/.."
DISTRAIN=${DISTRAIN:-distrain}
if ! command -v "$DISTRAIN" >/dev/null 2>&1 && [[ -x .venv/bin/distrain ]]; then
  DISTRAIN=.venv/bin/distrain
fi
case ${1:-} in
  "") check=() ;;
  --check) check=(--check) ;;
  *) echo "regenerate.sh: unknown argument: $1 (usage: slurm/regenerate.sh [--check])" >&2; exit 2 ;;
esac

status=0
# render NAME OPTIONS...: slurm/NAME.sh from jobs/NAME.yaml.
render() {
  local name=$1; shift
  "$DISTRAIN" slurm render "jobs/$name.yaml" "$@" --output "slurm/$name.sh" ${check[@]+"${check[@]}"} || status=1
}

# The layouts users get from `sbatch slurm/NAME.sh`; `sbatch --nodes=N` scales each of them out.
render mlp --nodes 1 --gpus-per-node 1 --time 01:00:00
render cnn --nodes 1 --gpus-per-node 1 --time 01:00:00
render residual --nodes 1 --gpus-per-node 2 --time 08:00:00
render inception --nodes 1 --gpus-per-node 2 --time 08:00:00
render mobilenet --nodes 1 --gpus-per-node 4 --time 24:00:00
exit $status
