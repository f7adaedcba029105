#!/usr/bin/env bash
# Sets up .venv and trains the offline quickstart job (the course CNN on scikit-learn's digits).
#   scripts/quickstart.sh                         about a minute on 2 CPU cores
#   scripts/quickstart.sh --set train.epochs=3    any `distrain train` option
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/distrain train jobs/quickstart.yaml "$@"
