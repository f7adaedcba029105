#!/usr/bin/env bash
# A Ray cluster inside a SLURM allocation, for one `distrain ray` run: the head on the first node,
# a Ray worker node on each other node, then `distrain ray JOB ...`, then everything is torn down.
#
# Submit from the repository root, with distrain's virtualenv active (the repo and the venv on a
# file system every node mounts; sbatch exports the environment, so the nodes find the same
# `ray` and `distrain`):
#   one node, CPUs only (2 Ray workers):
#     sbatch --nodes=1 --cpus-per-task=2 cluster/ray/ray-on-slurm.sh jobs/quickstart.yaml \
#         --workers 2 --storage-path "$PWD/runs/ray"
#   several GPU nodes (default: one Ray worker per GPU of the allocation, --gpus-per-worker 1):
#     sbatch --nodes=4 --gpus-per-node=2 --cpus-per-task=16 cluster/ray/ray-on-slurm.sh \
#         jobs/cnn.yaml --max-failures 3 --storage-path /shared/ray-runs --name cnn-1
#   Everything after the script's name is passed to `distrain ray`. --storage-path must be on the
#   shared file system (the run dir is STORAGE/NAME/run); give --name to be able to rerun the same
#   run: a rerun with the same --storage-path and --name resumes from the run's backup.
#
# Environment (optional):
#   DISTRAIN_VENV         a virtualenv to activate first (default: whatever is on PATH)
#   RAY_PORT              the head's GCS port (default: derived from the job id, 20000-39999; the
#                         dashboard uses RAY_PORT+1 and the Ray client server RAY_PORT+2)
#   RAY_DASHBOARD_HOST    where the dashboard listens (default 127.0.0.1; reach it with
#                         ssh -L 8265:127.0.0.1:<RAY_PORT+1> <first node>)
#   RAY_NODE_TIMEOUT      seconds to wait for the head and for every node to join (default 180)
#   RAY_AUTH_MODE         unset (default): a new token per job (Ray's token authentication);
#                         "disabled": anyone who reaches the nodes' Ray ports can use the cluster
#
# Exit code: `distrain ray`'s (0 done, 1 failed, 2 bad input, 75/76/77 see docs/ray.md), or 1 when
# the Ray cluster did not come up. Ray's daemons (GCS, raylets, object managers) listen on all
# interfaces of their nodes: run this on a cluster network you trust (docs/ray.md).
#
#SBATCH --job-name=distrain-ray
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ -n "${DISTRAIN_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$DISTRAIN_VENV/bin/activate"
fi
: "${SLURM_JOB_ID:?run this with sbatch (or inside salloc)}"
if [ $# -lt 1 ]; then
  echo "usage: sbatch [options] $0 JOB.yaml [distrain ray options]" >&2
  exit 2
fi

log() { echo "ray-on-slurm: $(date +%T) $*" >&2; }

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
node_addr() {  # SLURM's NodeAddr for a node name (node names need not be host names)
  local addr
  addr=$(scontrol -o show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  echo "${addr:-$1}"
}
head_node=${nodes[0]}
head_addr=$(node_addr "$head_node")
port=${RAY_PORT:-$((20000 + (SLURM_JOB_ID * 7) % 19990))}
address="$head_addr:$port"
timeout=${RAY_NODE_TIMEOUT:-180}
# Short and per job: Ray's unix sockets live here (paths are limited to 107 bytes).
temp_dir="/tmp/ray-$SLURM_JOB_ID"
cpus=${SLURM_CPUS_PER_TASK:-1}
# Nothing to drain at teardown; a drain would only make every `ray start --block` wait 30 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
export RAY_USAGE_STATS_ENABLED=0

steps=()
token_file=""
# shellcheck disable=SC2317  # called by the EXIT trap
teardown() {
  local rc=$?
  if [ ${#steps[@]} -gt 0 ]; then
    log "stopping Ray (${#steps[@]} node(s))"
    # SIGTERM reaches `ray start --block` through srun; it stops its node's daemons. SLURM kills
    # whatever is left of the steps when the job ends. Never `ray stop`: it would kill every Ray
    # process of this user on the node, other jobs' included.
    kill -TERM "${steps[@]}" 2>/dev/null || true
    for _ in $(seq 30); do
      local alive=0 pid
      for pid in "${steps[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 1 ] || break
      sleep 1
    done
    kill -KILL "${steps[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
  fi
  srun --nodes="${#nodes[@]}" --ntasks-per-node=1 --overlap rm -rf "$temp_dir" 2>/dev/null || true
  [ -z "$token_file" ] || rm -f "$token_file"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 143' TERM INT

# Ray's daemons listen on all interfaces, and anyone who reaches the GCS can run code as you. A
# fresh token per job (Ray's token authentication), in a file only you can read on the shared home,
# keeps the other users of the cluster out. RAY_AUTH_MODE=disabled turns it off.
if [ -z "${RAY_AUTH_MODE:-}" ]; then
  token_file="$HOME/.ray/distrain-slurm-$SLURM_JOB_ID.token"
  (umask 077 && mkdir -p "$HOME/.ray" && python -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
fi

log "head on $head_node ($address), $((${#nodes[@]} - 1)) more node(s), temp dir $temp_dir"
srun --nodes=1 --ntasks=1 -w "$head_node" \
  ray start --head --block --node-ip-address="$head_addr" --port="$port" \
    --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" --dashboard-port=$((port + 1)) \
    --ray-client-server-port=$((port + 2)) --num-cpus="$cpus" --temp-dir="$temp_dir" \
    --disable-usage-stats &
steps+=($!)

deadline=$((SECONDS + timeout))
until ray health-check --address "$address" >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ] || ! kill -0 "${steps[0]}" 2>/dev/null; then
    log "the Ray head did not start on $head_node within ${timeout}s"
    exit 1
  fi
  sleep 2
done

for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --block --address="$address" --node-ip-address="$(node_addr "$node")" \
      --num-cpus="$cpus" --temp-dir="$temp_dir" --disable-usage-stats &
  steps+=($!)
done

# Wait until every node has joined: `distrain ray` checks the request against what is there.
python - "$address" "${#nodes[@]}" "$((deadline - SECONDS))" <<'EOF'
import sys
import time

import ray

address, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR")
deadline = time.monotonic() + max(timeout, 10)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= expected:
        resources = ray.cluster_resources()
        print(f"ray-on-slurm: {time.strftime('%H:%M:%S')} {len(alive)} node(s) up: {resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs", file=sys.stderr)
        break
    if time.monotonic() > deadline:
        sys.exit(f"ray-on-slurm: only {len(alive)} of {expected} node(s) joined the Ray cluster")
    time.sleep(2)
EOF

# Default: one Ray worker per GPU of the allocation, else one per node.
args=("$@")
if [[ " ${args[*]} " != *" --workers "* && " ${args[*]} " != *" --workers="* ]]; then
  gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  gpus_per_node=${gpus_per_node##*:}  # --gpus-per-node=a100:2 gives "a100:2"
  if [ "${gpus_per_node:-0}" -gt 0 ] 2>/dev/null; then
    args+=(--workers "$((${#nodes[@]} * gpus_per_node))" --gpus-per-worker 1)
  else
    args+=(--workers "${#nodes[@]}")
  fi
fi

log "distrain ray ${args[*]}"
set +e
RAY_ADDRESS="$address" distrain ray "${args[@]}"
rc=$?
set -e
exit "$rc"
