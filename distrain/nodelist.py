"""SLURM's compressed host lists and task counts, expanded without calling ``scontrol``.

``scontrol show hostnames`` would do the same, but it is not on the PATH of every task (or of a
laptop running the unit tests), and the result must be identical on every rank.
"""
from __future__ import annotations

import re


def _split_top_level(text: str) -> list[str]:
    """Splits on commas that are not inside brackets: ``a[1,2],b`` → ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range(body: str, text: str) -> list[str]:
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in host list {text!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {text!r}")
        width = len(lo)  # SLURM keeps leading zeros: node[01-03] → node01, node02, node03
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(pattern: str, text: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [name for value in _expand_range(m.group(1), text)
            for name in _expand_one(head + value + tail, text)]


def expand_hostlist(text: str) -> list[str]:
    """Expands a SLURM host list in order, keeping duplicates out.

    Examples:
        >>> expand_hostlist("node[01-03,07]")
        ['node01', 'node02', 'node03', 'node07']
        >>> expand_hostlist("a[1-2]-ib,b3")
        ['a1-ib', 'a2-ib', 'b3']

    Raises:
        ValueError: the text is not a host list.
    """
    hosts: list[str] = []
    for part in _split_top_level(text or ""):
        for host in _expand_one(part, text):
            if host not in hosts:
                hosts.append(host)
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """Expands ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``.

    Examples:
        >>> expand_tasks_per_node("2(x3),1")
        [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {text!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
