#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it.
#   scripts/test.sh                  the whole suite (what CI runs, via .ci/run)
#   scripts/test.sh tests/test_spec.py -k overrides     any pytest arguments
# Installs: .venv with distrain[test,ray]; Debian's slurm-wlm, munge, strace, shellcheck and iproute2; Horovod 0.28.1
# built by scripts/install-horovod.sh (about 3 minutes once, then from .cache/wheels).
# Services: the tests start and stop their own local SLURM (cluster/slurm-local.sh), Ray head and
# TensorBoard, on 127.0.0.1 and free ports, and stop them by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start ))s)" >&2; }

step "python environment"
scripts/setup.sh test,ray
step "system packages: slurm-wlm, munge, strace, shellcheck, iproute2"
cluster/slurm-local.sh install
missing=()
# command:package pairs; iproute2 (ip, tc) builds the simulated network of cluster/netns-pair.sh.
for pair in strace:strace shellcheck:shellcheck ip:iproute2 tc:iproute2; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if (( ${#missing[@]} )); then
  apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
step "horovod"
scripts/install-horovod.sh --python .venv/bin/python
step "tests"
# A backend that is missing here must fail the suite, not skip its tests.
export DISTRAIN_REQUIRE_SLURM=1 DISTRAIN_REQUIRE_RAY=1 DISTRAIN_REQUIRE_HOROVOD=1 DISTRAIN_REQUIRE_SHELLCHECK=1 DISTRAIN_REQUIRE_NETNS=1 DISTRAIN_REQUIRE_TMPFS=1
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
step "done: pytest exit code $rc"
exit "$rc"
