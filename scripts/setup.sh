#!/usr/bin/env bash
# Creates .venv and installs distrain into it (editable), idempotently.
#   scripts/setup.sh                 distrain itself (TensorFlow 2.21 + tf-keras 2.21, CPU or GPU)
#   scripts/setup.sh test,ray        with extras from setup.cfg
# A run does nothing when setup.cfg and pyproject.toml are unchanged since the last install and the
# extras asked for were installed then: a stamp in .venv records the hash of the two files and the
# installed extras, so scripts/quickstart.sh (no extras) after scripts/test.sh (test,ray) installs
# nothing. An install keeps the extras installed before: it installs them together with the new ones.
set -euo pipefail

# The extras as a sorted set, comma-separated: "test, ray,test" -> "ray,test"; "" stays "".
normalize_extras() {
  tr -s ', ' '\n' <<<"$1" | sed '/^$/d' | LC_ALL=C sort -u | paste -sd, -
}

# The extras a stamp file records ("" without a stamp). The stamp is "HASH EXTRAS".
stamp_extras() {
  local hash="" extras=""
  if [ -f "$1" ]; then
    read -r hash extras <"$1" || true  # false at a last line without a newline, which is still read
  fi
  normalize_extras "$extras"
}

# Succeeds when stamp file $1 records hash $2 and every extra of $3.
stamp_covers() {
  local hash="" have extra
  [ -f "$1" ] || return 1
  read -r hash _ <"$1" || true
  [ "$hash" = "$2" ] || return 1
  have=",$(stamp_extras "$1"),"
  for extra in $(normalize_extras "$3" | tr , ' '); do
    [[ "$have" == *",$extra,"* ]] || return 1
  done
}

main() {
  cd "$(dirname "$0")/.."
  local python="${PYTHON:-python3}" stamp=".venv/.distrain-setup" hash extras spec
  if [ ! -x .venv/bin/python ]; then
    rm -f "$stamp"  # a stamp left in a broken venv describes nothing
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  hash="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
  if stamp_covers "$stamp" "$hash" "${1:-}"; then
    exit 0
  fi
  # Installing only the new extras would leave the stamp claiming fewer than the venv holds, and
  # the next run with the old ones would install again.
  extras="$(normalize_extras "$(stamp_extras "$stamp"),${1:-}")"
  spec="."
  [ -n "$extras" ] && spec=".[${extras}]"
  echo "setup: installing distrain${extras:+ with $extras} into .venv (TensorFlow is ~600 MB the first time)" >&2
  .venv/bin/python -m pip install -q -e "$spec"
  echo "$hash $extras" >"$stamp"
}

# Sourced (by tests) it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
