#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (TensorFlow + Gloo) into a Python environment that has TF 2.21.
#
# Usage:
#   scripts/install-horovod.sh [--python PATH] [--cache DIR]
#
#   --python PATH  interpreter of the target environment (default: <repo>/.venv/bin/python).
#                  TensorFlow must already be installed there.
#   --cache DIR    wheel cache (default: ${DISTRAIN_WHEEL_CACHE:-<repo>/.cache/wheels}).
#
#   Environment:
#     HOROVOD_GPU_OPERATIONS=NCCL  build the NCCL GPU ops as well (needs nvcc; NCCL found through
#                                  HOROVOD_NCCL_HOME or the CUDA toolkit). Without it the build is
#                                  CPU-only, whatever HOROVOD_GPU_* variables are set.
#     HOROVOD_CMAKE=/path/cmake    use this CMake instead of Debian's /usr/bin/cmake.
#     MAKEFLAGS, HOROVOD_BUILD_ARCH_FLAGS, HOROVOD_BUILD_CUDA_CC_LIST are passed to the build.
#
#   Exit codes: 0 installed (or already there), 1 build/install/verification failed, 2 bad usage
#   or an environment this script cannot build in (e.g. no TensorFlow).
#
# Why this script exists (details and upstream links: docs/horovod-build.md):
#   Horovod's last release, 0.28.1 (2023), ships only an sdist, and `pip install horovod` does not
#   build against TF 2.21. Each step below works around one reason:
#   1. Fast path: if `import horovod.tensorflow` works, its extension reports Gloo (and NCCL when
#      asked for) as built and `horovodrun` runs, there is nothing to do.
#   2. Cache: the wheel is built once per (horovod, TF, Python, arch, CPU/NCCL, patch) and kept in
#      the wheel cache; another venv with the same TF installs it in seconds.
#   3. Build tools: CMake 3.x, because CMake 4 refuses the bundled gloo
#      (cmake_minimum_required(VERSION 2.8.12)); Debian 12's /usr/bin/cmake is 3.25. We point
#      Horovod's setup.py at it with HOROVOD_CMAKE so a CMake 4 from pip on PATH is not picked up.
#   4. The sdist is patched (scripts/horovod-tf221.patch): horovod/tensorflow/xla_mpi_ops.cc is
#      dropped, since it includes XLA headers that need highwayhash headers the TF wheel lacks.
#   5. `pip wheel --no-build-isolation`: Horovod's CMake imports TensorFlow to find its headers and
#      flags; build isolation would hide the target environment's TensorFlow.
#   6. Verification: `horovodrun --check-build` and a 2-process Gloo allreduce on localhost, with
#      TF_USE_LEGACY_KERAS=1 as distrain runs it.
set -euo pipefail

readonly HOROVOD_VERSION=0.28.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
readonly SCRIPT_DIR REPO_DIR
readonly PATCH_FILE="$SCRIPT_DIR/horovod-tf221.patch"

log() { echo "install-horovod: $*" >&2; }
die() { echo "install-horovod: error: $1" >&2; exit "${2:-1}"; }
usage_error() { echo "install-horovod: $*" >&2; echo "usage: $0 [--python PATH] [--cache DIR]" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
PY="$REPO_DIR/.venv/bin/python"
CACHE_ROOT="${DISTRAIN_WHEEL_CACHE:-$REPO_DIR/.cache/wheels}"
while (($#)); do
    case "$1" in
        --python) (($# >= 2)) || usage_error "--python needs a path"; PY=$2; shift 2 ;;
        --python=*) PY=${1#*=}; shift ;;
        --cache) (($# >= 2)) || usage_error "--cache needs a directory"; CACHE_ROOT=$2; shift 2 ;;
        --cache=*) CACHE_ROOT=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown argument '$1' (valid: --python PATH, --cache DIR)" ;;
    esac
done

CACHE_ROOT=$(realpath -m "$CACHE_ROOT")
if [[ $PY != */* ]]; then PY=$(command -v "$PY" || true); fi
[[ -n $PY && -x $PY ]] || die "--python: '$PY' is not an executable interpreter" 2
# Absolute path, but not through symlinks: a venv's python is a symlink to the base interpreter.
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"

# TensorFlow's version from package metadata: importing TF takes seconds, and this runs on the
# fast path too. packages_distributions() also finds tensorflow-cpu and other TF wheels.
TF_VERSION=$("$PY" - 2>/dev/null <<'EOF' || true
import importlib.metadata as md
dists = md.packages_distributions().get("tensorflow", [])
# Plugins may also install into the tensorflow package; prefer the TF wheel itself.
dists.sort(key=lambda d: d.lower().replace("_", "-") not in
           ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel"))
print(md.version(dists[0]) if dists else "")
EOF
)
[[ -n $TF_VERSION ]] || die "$PY has no TensorFlow; install it first (pip install -e '.[horovod]' in the repo)" 2

SCRIPTS_DIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
HOROVODRUN="$SCRIPTS_DIR/horovodrun"
# distrain runs tf-keras (Keras 2) through tf.keras; every check below runs the same way.
export TF_USE_LEGACY_KERAS=1

# CPU-only unless NCCL GPU ops are asked for and can be built. Upstream's CMake builds GPU ops
# whenever any HOROVOD_GPU_* variable is set, so in CPU mode they are cleared (and said so).
GPU_VARS=(HOROVOD_GPU HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST
          HOROVOD_GPU_ALLTOALL HOROVOD_GPU_REDUCESCATTER)
case "${HOROVOD_GPU_OPERATIONS:-}" in
    "")
        OPS=cpu
        for v in "${GPU_VARS[@]}"; do
            if [[ -n ${!v:-} ]]; then
                log "ignoring $v=${!v}: CPU-only build (set HOROVOD_GPU_OPERATIONS=NCCL for GPU ops)"
                unset "$v"
            fi
        done
        ;;
    NCCL)
        command -v nvcc >/dev/null || [[ -x ${HOROVOD_CUDA_HOME:-/nonexistent}/bin/nvcc ]] \
            || die "HOROVOD_GPU_OPERATIONS=NCCL but no nvcc (PATH or \$HOROVOD_CUDA_HOME/bin); unset it for a CPU-only build" 2
        OPS=nccl
        ;;
    *)
        die "HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS}: only NCCL (or unset, CPU-only) is supported; this build has no MPI" 2
        ;;
esac

FEATURES="TensorFlow and Gloo"
[[ $OPS == cpu ]] || FEATURES="TensorFlow, Gloo and NCCL"

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$WORK_DIR"' EXIT
CHECK_ERR="$WORK_DIR/check-build.stderr"

PATCH_ID=$(sha256sum "$PATCH_FILE" | cut -c1-8)
CACHE_KEY="horovod-${HOROVOD_VERSION}_tf${TF_VERSION}_${PY_TAG}_$(uname -m)_${OPS}_patch${PATCH_ID}"
CACHE_DIR="$CACHE_ROOT/$CACHE_KEY"

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
# check_build_output: the `horovodrun --check-build` report (stdout) of the installed Horovod, or
# failure. Its stderr (TensorFlow's start-up logging, or a traceback) goes to $CHECK_ERR.
check_build_output() {
    [[ -x $HOROVODRUN ]] || { echo "$HOROVODRUN does not exist" >"$CHECK_ERR"; return 1; }
    "$HOROVODRUN" --check-build 2>"$CHECK_ERR"
}

# installed_ok: true when the target already has a usable Horovod (the idempotent fast path).
# It asks the TF extension the same questions as `horovodrun --check-build` (gloo_built,
# nccl_built), but in one process: check-build forks a fresh TensorFlow import per line of its
# report and takes ~15 s here, this takes ~4 s. verify() still runs the real check-build.
installed_ok() {
    [[ -x $HOROVODRUN ]] && "$HOROVODRUN" --version >/dev/null 2>&1 || return 1
    OPS=$OPS "$PY" -c '
import os, sys
import horovod.tensorflow as hvd
ok = hvd.gloo_built() and (os.environ["OPS"] == "cpu" or hvd.nccl_built())
sys.exit(0 if ok else 1)' >/dev/null 2>&1
}

has_features() {
    grep -q '\[X\] TensorFlow' <<<"$1" && grep -q '\[X\] Gloo' <<<"$1" \
        && { [[ $OPS == cpu ]] || grep -q '\[X\] NCCL' <<<"$1"; }
}

# verify: check-build plus a 2-process Gloo allreduce on localhost. Prints the evidence.
VERIFY_HINT=""  # appended to verification errors; says so when the wheel came from the cache
verify() {
    local out
    if ! out=$(check_build_output) || ! has_features "$out"; then
        tail -n 20 "$CHECK_ERR" >&2
        printf '%s\n' "$out" >&2
        die "horovodrun --check-build does not list $FEATURES as built (output above)$VERIFY_HINT"
    fi
    printf '%s\n' "$out"

    # hvd.allreduce averages by default: ranks 0 and 1 must both print 0.5. horovodrun starts
    # "$PY" by absolute path; PATH gets the env's scripts dir for anything it spawns itself.
    # timeout: a rendezvous that never completes must fail here, not hang the caller.
    local smoke
    smoke=$(PATH="$SCRIPTS_DIR:$PATH" timeout 300 "$HOROVODRUN" -np 2 -H localhost:2 --gloo \
        "$PY" -c "import horovod.tensorflow as hvd; hvd.init(); import tensorflow as tf; print(hvd.rank(), hvd.allreduce(tf.constant(float(hvd.rank()))).numpy())" 2>&1) \
        || { printf '%s\n' "$smoke" | tail -n 30 >&2; die "2-process Gloo smoke test failed (last lines above)$VERIFY_HINT"; }
    local ranks
    ranks=$(grep -cE '^\[[01]\]<stdout>:[01] 0\.5$' <<<"$smoke" || true)
    if [[ $ranks != 2 ]]; then
        printf '%s\n' "$smoke" | tail -n 30 >&2
        die "2-process Gloo smoke test: expected ranks 0 and 1 to print 0.5 (output above)$VERIFY_HINT"
    fi
    grep -E '^\[[01]\]<stdout>:' <<<"$smoke"
}

install_runtime_deps() {
    # Horovod's install_requires (setup.py require_list). packaging is also imported by its
    # setup.py, so it must be there before a --no-build-isolation build.
    "$PY" -m pip install -q --disable-pip-version-check cloudpickle psutil pyyaml packaging \
        || die "pip could not install Horovod's runtime dependencies into $PY"
}

install_wheel() {
    # --force-reinstall: the fast path failed, so whatever horovod is installed is not usable.
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$1" \
        || die "pip could not install $1"
}

# ---------------------------------------------------------------------------------------------
# 1. Fast path
# ---------------------------------------------------------------------------------------------
if installed_ok; then
    log "Horovod already installed in $PY with $FEATURES; nothing to do"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 2. Cached wheel
# ---------------------------------------------------------------------------------------------
cached_wheel() { compgen -G "$CACHE_DIR/horovod-*.whl" | head -n 1; }
WHEEL=$(cached_wheel || true)
if [[ -n $WHEEL ]]; then
    log "installing cached wheel $WHEEL"
    start=$SECONDS
    install_runtime_deps
    install_wheel "$WHEEL"
    log "installed from cache in $((SECONDS - start)) s; verifying"
    VERIFY_HINT="; the wheel came from the cache: remove $CACHE_DIR to rebuild it"
    start=$SECONDS
    verify
    log "verified in $((SECONDS - start)) s"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 3. Build tools
# ---------------------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || die "missing build tools ($*) and no apt-get to install them" 2
    [[ $(id -u) == 0 ]] || die "missing build tools ($*); install them as root: apt-get install $*" 2
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

cmake_major() { "$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\)\..*/\1/p'; }

if [[ -n ${HOROVOD_CMAKE:-} ]]; then
    CMAKE_BIN=$HOROVOD_CMAKE
else
    CMAKE_BIN=/usr/bin/cmake
    [[ $(cmake_major "$CMAKE_BIN") == 3 ]] || apt_install cmake
fi
[[ -n $(cmake_major "$CMAKE_BIN") ]] || die "$CMAKE_BIN is not a working CMake" 2
if [[ $(cmake_major "$CMAKE_BIN") != 3 && -z ${HOROVOD_CMAKE:-} ]]; then
    die "need CMake 3.x (CMake 4 refuses the bundled gloo); set HOROVOD_CMAKE=/path/to/cmake3" 2
fi
export HOROVOD_CMAKE="$CMAKE_BIN"
# Only matters if HOROVOD_CMAKE is a CMake 4: lets it configure gloo's cmake_minimum_required(2.8.12).
export CMAKE_POLICY_VERSION_MINIMUM=3.5

missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v patch >/dev/null || missing+=(patch)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"

# The TensorFlow extension does not include Python.h (only horovod/torch does), so missing
# headers are reported, not fatal.
PY_INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[[ -f $PY_INCLUDE/Python.h ]] || log "note: no Python.h under $PY_INCLUDE (not needed for the TensorFlow-only build)"

# setuptools and wheel must be importable in the target env for --no-build-isolation.
if ! "$PY" -c 'import setuptools, wheel' >/dev/null 2>&1; then
    log "installing setuptools and wheel into the target env (needed by pip wheel --no-build-isolation)"
    "$PY" -m pip install -q --disable-pip-version-check setuptools wheel || die "pip could not install setuptools/wheel"
fi
install_runtime_deps

# ---------------------------------------------------------------------------------------------
# 4. Source + patch, 5. build
# ---------------------------------------------------------------------------------------------
mkdir -p "$CACHE_DIR"
BUILD_LOG="$CACHE_ROOT/$CACHE_KEY.build.log"
# The log ends in pip's traceback; the cause (a CMake or compiler error) is usually well above it,
# so show the first error and the last lines.
fail_with_log() {
    local first
    first=$(grep -n -m 1 -E 'CMake Error|fatal error|error:|Error [0-9]+' "$BUILD_LOG" | cut -d: -f1 || true)
    if [[ -n $first ]]; then
        echo "----- first error in $BUILD_LOG (line $first) -----" >&2
        sed -n "${first},$((first + 14))p" "$BUILD_LOG" >&2
    fi
    echo "----- last 15 lines of $BUILD_LOG -----" >&2
    tail -n 15 "$BUILD_LOG" >&2
    echo "-----" >&2
    die "$1 (full log: $BUILD_LOG)"
}

log "downloading the horovod==$HOROVOD_VERSION sdist"
: >"$BUILD_LOG"
"$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
    "horovod==$HOROVOD_VERSION" -d "$WORK_DIR/sdist" >>"$BUILD_LOG" 2>&1 \
    || fail_with_log "pip download horovod==$HOROVOD_VERSION failed"
tar -xzf "$WORK_DIR/sdist/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK_DIR"
SRC_DIR="$WORK_DIR/horovod-$HOROVOD_VERSION"
patch -d "$SRC_DIR" -p1 --forward --batch <"$PATCH_FILE" >>"$BUILD_LOG" 2>&1 \
    || fail_with_log "$PATCH_FILE does not apply to horovod $HOROVOD_VERSION"

# Gloo only: no MPI on these machines, and PyTorch/MXNet are not distrain's business.
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
# setup.py passes -j8 to make unless MAKEFLAGS is set; -j8 on a 2-core box only thrashes.
# HOROVOD_BUILD_ARCH_FLAGS is left at upstream's default (-mf16c -mavx -mfma) rather than
# -march=native, because the cached wheel may be installed on another x86-64 machine.
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"

log "building Horovod $HOROVOD_VERSION for TF $TF_VERSION/$PY_TAG ($OPS) with $("$CMAKE_BIN" --version | head -n 1), MAKEFLAGS=$MAKEFLAGS; log: $BUILD_LOG"
start=$SECONDS
"$PY" -m pip wheel -v --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$WORK_DIR/dist" "$SRC_DIR" >>"$BUILD_LOG" 2>&1 \
    || fail_with_log "building the Horovod wheel failed"
build_s=$((SECONDS - start))
built=$(compgen -G "$WORK_DIR/dist/horovod-*.whl" | head -n 1) \
    || fail_with_log "pip wheel succeeded but left no horovod wheel"
log "built $(basename "$built") in ${build_s} s"

# Into the cache via rename, so a concurrent reader never sees half a wheel.
incoming=$(mktemp "$CACHE_DIR/.incoming.XXXXXX")
cp "$built" "$incoming"
chmod 0644 "$incoming"  # mktemp creates 0600; a shared cache must be readable by others
mv "$incoming" "$CACHE_DIR/$(basename "$built")"
WHEEL="$CACHE_DIR/$(basename "$built")"

# ---------------------------------------------------------------------------------------------
# 6. Install + verify
# ---------------------------------------------------------------------------------------------
install_wheel "$WHEEL"
start=$SECONDS
verify
log "verified in $((SECONDS - start)) s"
log "done: Horovod $HOROVOD_VERSION installed into $PY (wheel cached at $WHEEL)"
