#!/usr/bin/env bash
# Two simulated hosts on one machine: Linux network namespaces NAME-a and NAME-b joined by a veth
# pair whose bandwidth (tc tbf) and one-way latency (tc netem, where the kernel has it) are set,
# one command run in each, everything torn down on every exit (done, failed, Ctrl-C, SIGTERM).
#
#   sudo cluster/netns-pair.sh --rate 1gbit -- 'CMD ON HOST A' 'CMD ON HOST B'
#   sudo cluster/netns-pair.sh --rate 100mbit --delay 0.5ms --cpus-a 0 --cpus-b 1 -- 'A' 'B'
#   benchmarks/network.py       runs distrain's 2-worker step-time measurements through this script
#
# The hosts are 10.213.0.1 (a) and 10.213.0.2 (b), a /30 that exists only inside the two
# namespaces: nothing is configured in the machine's own namespace and no traffic leaves the pair.
# Each command runs under `sh -c` inside its namespace (pinned with taskset when --cpus-* is given)
# and sees NETNS_INDEX (0 for a, 1 for b), NETNS_SELF, NETNS_PEER, NETNS_HOST_A and NETNS_HOST_B.
# When one command fails, the other is stopped. Exit code: the first failure's, else 0; 2 for bad
# usage (nothing created), 130/143 when interrupted.
#
# Needs root, iproute2 (`ip netns`, `tc`) and, for --delay, the kernel's netem qdisc
# (CONFIG_NET_SCH_NETEM; some container kernels lack it: --delay then fails with exit 2).
set -uo pipefail

ADDR_A=10.213.0.1
ADDR_B=10.213.0.2
PREFIX_LEN=30

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    echo "usage: $0 [--rate RATE] [--delay DELAY] [--cpus-a LIST] [--cpus-b LIST] [--name NAME] [--burst BYTES] -- CMD_A CMD_B" >&2
    exit 2
}

die_usage() {
    echo "netns-pair.sh: $*" >&2
    exit 2
}

RATE="" DELAY="" CPUS_A="" CPUS_B="" NAME="dtnet$$" BURST=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE="${2:?--rate needs a value, e.g. 1gbit}"; shift 2 ;;
        --delay) DELAY="${2:?--delay needs a value, e.g. 0.5ms}"; shift 2 ;;
        --cpus-a) CPUS_A="${2:?--cpus-a needs a CPU list}"; shift 2 ;;
        --cpus-b) CPUS_B="${2:?--cpus-b needs a CPU list}"; shift 2 ;;
        --name) NAME="${2:?--name needs a value}"; shift 2 ;;
        --burst) BURST="${2:?--burst needs bytes}"; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        *) die_usage "unknown option $1 (give the two commands after --)" ;;
    esac
done
[ $# -eq 2 ] || die_usage "expected two commands after --, got $#"
CMD_A=$1 CMD_B=$2
[[ "$NAME" =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || die_usage "--name: letters, digits, . _ - only (got '$NAME')"
[[ -z "$RATE" || "$RATE" =~ ^[0-9.]+([kmg]?bit)$ ]] || die_usage "--rate: expected e.g. 100mbit, 1gbit, 10gbit (got '$RATE')"
[[ -z "$DELAY" || "$DELAY" =~ ^[0-9.]+(us|ms)$ ]] || die_usage "--delay: expected e.g. 100us or 0.5ms (got '$DELAY')"
[ "$(id -u)" -eq 0 ] || die_usage "needs root (network namespaces)"
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then die_usage "needs iproute2 (ip, tc)"; fi
if [ -n "$CPUS_A$CPUS_B" ]; then command -v taskset >/dev/null || die_usage "--cpus-*: needs taskset (util-linux)"; fi
NS_A="$NAME-a" NS_B="$NAME-b"
for ns in "$NS_A" "$NS_B"; do
    [ ! -e "/var/run/netns/$ns" ] || die_usage "--name: namespace $ns exists already (another run, or pick a name)"
done

CREATED=()
# shellcheck disable=SC2317  # called from cleanup
pids_in() {
    # The processes in our namespaces are the commands we started and their children.
    local ns
    for ns in "${CREATED[@]}"; do ip netns pids "$ns" 2>/dev/null; done
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$? ns
    local -a pids
    trap - EXIT INT TERM
    mapfile -t pids < <(pids_in)
    [ "${#pids[@]}" -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        mapfile -t pids < <(pids_in)
        [ "${#pids[@]}" -eq 0 ] && break
        sleep 0.5
    done
    mapfile -t pids < <(pids_in)
    [ "${#pids[@]}" -eq 0 ] || kill -KILL "${pids[@]}" 2>/dev/null
    # Deleting a namespace removes its end of the veth pair, and with it the pair.
    for ns in "${CREATED[@]}"; do ip netns del "$ns" 2>/dev/null; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setup() {
    ip netns add "$NS_A" && CREATED+=("$NS_A") || return 1
    ip netns add "$NS_B" && CREATED+=("$NS_B") || return 1
    # Created directly inside the namespaces: the machine's own namespace never holds either end.
    ip link add veth0 netns "$NS_A" type veth peer name veth0 netns "$NS_B" || return 1
    local ns addr
    for ns in "$NS_A" "$NS_B"; do
        addr=$ADDR_A; [ "$ns" = "$NS_B" ] && addr=$ADDR_B
        ip -n "$ns" link set lo up || return 1
        ip -n "$ns" addr add "$addr/$PREFIX_LEN" dev veth0 || return 1
        ip -n "$ns" link set veth0 up || return 1
        shape "$ns" || return 1
    done
}

shape() {
    # Egress of each end, so both directions see the rate and the delay. tbf: the rate, a bucket of
    # at least one 64 KiB TSO segment (smaller buckets throttle below the rate), a queue of 100 ms.
    local ns=$1
    local -a parent=(root)
    if [ -n "$DELAY" ]; then
        ip netns exec "$ns" tc qdisc add dev veth0 root handle 1: netem delay "$DELAY" limit 100000 2>/dev/null || {
            echo "netns-pair.sh: --delay: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)" >&2; exit 2; }
        parent=(parent 1:1)
    fi
    if [ -n "$RATE" ]; then
        local burst=${BURST:-$(burst_for "$RATE")}
        ip netns exec "$ns" tc qdisc add dev veth0 "${parent[@]}" handle 10: tbf rate "$RATE" burst "$burst" latency 100ms || return 1
    fi
}

burst_for() {
    # 1 ms of traffic at the rate, at least 64 KiB: tbf needs burst >= rate / HZ and >= one segment.
    local rate=$1 num unit bits
    num=${rate%%[kmg]bit}; num=${num%bit}; unit=${rate#"$num"}
    case "$unit" in kbit) bits=$(awk "BEGIN{print $num*1e3}") ;; mbit) bits=$(awk "BEGIN{print $num*1e6}") ;;
                    gbit) bits=$(awk "BEGIN{print $num*1e9}") ;; *) bits=$num ;; esac
    awk -v b="$bits" 'BEGIN{x=int(b/8/1000); if (x<65536) x=65536; print x}'
}

run_in() {
    local ns=$1 index=$2 self=$3 peer=$4 cpus=$5 cmd=$6
    local pin=()
    [ -z "$cpus" ] || pin=(taskset -c "$cpus")
    ip netns exec "$ns" env NETNS_INDEX="$index" NETNS_SELF="$self" NETNS_PEER="$peer" \
        NETNS_HOST_A="$ADDR_A" NETNS_HOST_B="$ADDR_B" "${pin[@]}" sh -c "$cmd"
}

setup || { echo "netns-pair.sh: setting up $NS_A/$NS_B failed" >&2; exit 1; }
echo "netns-pair.sh: $NS_A ($ADDR_A) <-> $NS_B ($ADDR_B), rate ${RATE:-unlimited}, delay ${DELAY:-none}" >&2

run_in "$NS_A" 0 "$ADDR_A" "$ADDR_B" "$CPUS_A" "$CMD_A" &
PID_A=$!
run_in "$NS_B" 1 "$ADDR_B" "$ADDR_A" "$CPUS_B" "$CMD_B" &
PID_B=$!

# The first to finish decides: a failure stops the other (a worker waiting for a dead peer would
# otherwise hang); a success waits for the other.
wait -n "$PID_A" "$PID_B"
FIRST=$?
if [ "$FIRST" -ne 0 ]; then
    echo "netns-pair.sh: a command failed (exit $FIRST); stopping the other" >&2
    exit "$FIRST"
fi
wait "$PID_A"; RC_A=$?
wait "$PID_B"; RC_B=$?
[ "$RC_A" -ne 0 ] && exit "$RC_A"
exit "$RC_B"
