"""Free TCP ports on 127.0.0.1 for local clusters, tests and benchmarks, below the ephemeral range.

A port the kernel hands out with ``bind(0)`` comes from its ephemeral range (32768-60999 on
Linux by default), the range it also takes every outgoing connection's local port from. Freed
again and given to a process that binds it seconds later (a worker once TensorFlow has loaded),
such a port can meanwhile be taken by any connection on the machine: srun's, a gRPC peer's.
Ports below the range are never handed out that way, so one that is free now stays free until
someone binds it on purpose.

    python3 cluster/free_ports.py N    # prints N consecutive free ports, space-separated

No dependencies beyond Python's standard library: slurm-local.sh runs it with the system Python.
"""
from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

# Above the well-known ports and Ray's default worker ports (10002-19999), which `ray start` refuses
# to share with the ports it is given.
LOWEST = 20000


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default if it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A base port with ``count`` consecutive ports free on ``host``, all below the ephemeral range."""
    high = ephemeral_start() - count
    for _ in range(200):
        base, socks = random.randrange(LOWEST, high), []
        try:
            for port in range(base, base + count):
                socks.append(socket.socket())
                socks[-1].bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host} between {LOWEST} and {high + count}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports on ``host`` (consecutive, below the ephemeral range)."""
    base = free_port_block(count, host)
    return list(range(base, base + count))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: free_ports.py N   (N >= 1 consecutive free ports on 127.0.0.1)")
    print(" ".join(map(str, free_ports(int(sys.argv[1])))))
