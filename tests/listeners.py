"""What TCP ports a set of processes listens on, and on which address, read from /proc.

Not a test module. ``listening(pids)`` is what ``ss -ltnp`` shows for those pids, without
needing ``ss``: the LISTEN sockets of /proc/net/tcp and tcp6 whose inode one of the pids holds.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

WILDCARD = "all interfaces"


class Listener(NamedTuple):
    address: str  # "0.0.0.0", "::", "127.0.0.1", ...
    port: int
    pid: int

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.address).is_unspecified


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(text[text.rindex(")") + 2:].split()[1])
    found, changed = {root}, True
    while changed:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        changed = bool(more)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints IPv6 as four little-endian 32-bit words.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.ip_address(words)
    return str(address.ipv4_mapped or address)


def listening(pids: Iterable[int]) -> list[Listener]:
    """The TCP listeners held by ``pids``, sorted by port."""
    owner: dict[int, int] = {}
    for pid in sorted(pids):  # a socket inherited by a child is reported once, with its parent's pid
        for inode in _socket_inodes(pid):
            owner.setdefault(inode, pid)
    found = set()
    for fields in tcp_sockets():
        if fields[3] != "0A":  # LISTEN
            continue
        inode = int(fields[9])
        if inode in owner:
            hex_address, hex_port = fields[1].rsplit(":", 1)
            found.add(Listener(_address(hex_address), int(hex_port, 16), owner[inode]))
    return sorted(found, key=lambda l: (l.port, l.address))


def tcp_sockets() -> Iterator[list[str]]:
    """The fields of every row of /proc/net/tcp and /proc/net/tcp6 (IPv4 and IPv6 sockets)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


def environ_has(pid: int, name: str) -> bool:
    """Whether process ``pid`` has the environment variable ``name``."""
    try:
        return any(v.startswith(name.encode() + b"=") for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def documented(doc: Path) -> dict[str, dict[str, str]]:
    """The listener table of docs/security.md: ``{id: {"bind": ..., "auth": ...}}``.

    Rows look like ``| `tf-grpc` | ... | bind | auth | ...`` with the columns named in the header.
    """
    rows, header = {}, None
    for line in doc.read_text().splitlines():
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(cells[0]) <= set("-: "):
            continue
        if "id" in header and cells[0].startswith("`"):
            row = dict(zip(header, cells))
            rows[cells[0].strip("`")] = {"bind": row["bind (measured)"], "auth": row["authentication (measured)"]}
    return rows
