#!/usr/bin/env bash
# Creates .venv and installs distrain into it (editable), idempotently.
#   scripts/setup.sh                 distrain itself (TensorFlow 2.21 + tf-keras 2.21, CPU or GPU)
#   scripts/setup.sh test,ray        with extras from setup.cfg
# A second run with the same setup.cfg and extras does nothing (a stamp in .venv records it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.distrain-setup"
want="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16) ${extras}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
echo "setup: installing distrain${extras:+ with $extras} into .venv (TensorFlow is ~600 MB the first time)" >&2
.venv/bin/python -m pip install -q -e "$spec"
echo "$want" > "$stamp"
