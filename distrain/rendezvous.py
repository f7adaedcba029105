"""The start-up rendezvous: every worker meets worker 0 before the strategy is built.

Why: a ``MultiWorkerMirroredStrategy`` (or Horovod) worker whose peer never starts waits inside
the strategy's constructor, in C++ holding Python's GIL, until the job's time limit; no Python
timer can end it. So the workers meet first, in plain Python sockets, and a worker whose peers do
not all arrive within ``distribute.startup_timeout_s`` exits with 76 (``EXIT_PEER_LOST``) and one
line naming the missing workers by rank and ``host:port``; the SLURM launcher requeues on 76.

How (one round, then the socket is gone):

1. Worker 0 listens on its own address from the world (``world.worker_addresses[0]``: the
   ``TF_CONFIG`` / SLURM address its peers will use for TensorFlow), on **that address only**, at
   its own port, before TensorFlow's server binds the port. Every other worker connects there.
2. Each side proves it holds the job's secret without sending it: worker 0 sends a nonce, the
   worker answers with its rank, its own nonce and an HMAC-SHA256 of both nonces, its rank and a
   digest of the worker list; worker 0 checks it and answers with an HMAC over the worker's nonce,
   so a worker never trusts a process that grabbed the port first. Peers without the secret (or
   with a different worker list) are refused and do not count.
3. When every rank is present, worker 0 **closes its listening socket first**, then tells every
   worker to go, waits for them to hang up (so the port is left without ``TIME_WAIT`` on worker
   0's side) and returns. TensorFlow's gRPC server, or Horovod's rendezvous server under ``srun``,
   then binds the same port; the listener was bound with ``SO_REUSEADDR`` like theirs.
4. At the deadline worker 0 tells the connected workers who is missing and everybody exits 76.

The secret (``secret_for``): the file named by ``DISTRAIN_SECRET_FILE`` if set (provisioned by
the user, read by every worker), else ``RUN_DIR/.rendezvous-secret``, created by worker 0 with
``O_EXCL`` and mode 0600 in the run dir every worker already shares, and reused by a resumed or
requeued run. Either file must belong to this user and be unreadable by group and others.
docs/security.md has the threat model and what else listens.

A world of one process, and Horovod/MPI launchers (``horovodrun``, ``mpirun``: they start every
process themselves and have their own start-up timeouts; the world has no addresses), skip it.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import selectors
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from distrain.errors import EXIT_PEER_LOST, TrainingStopped, UsageError
from distrain.rundir import SECRET_ENV, RunDir
from distrain.world import World

log = logging.getLogger("distrain")

PROTOCOL = "distrain-rendezvous/1"
SECRET_FILE = RunDir.RENDEZVOUS_SECRET  # in the run dir
_SECRET_PREFIX = "distrain-secret "
MAX_LINE = 4096  # bytes; a longer line is not a peer of ours
HANDSHAKE_S = 10.0  # an accepted connection must authenticate within this, or it is dropped
GO_GRACE_S = 15.0  # a joined worker waits this long past worker 0's deadline for its verdict
RETRY_S = 0.25


# ----------------------------------------------------------------------------- pure helpers

def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) → (host, port)."""
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def world_digest(addresses: Sequence[str]) -> str:
    """Both sides must agree on the worker list; a worker with another TF_CONFIG is refused."""
    return hashlib.sha256(json.dumps(list(addresses)).encode()).hexdigest()[:16]


def mac(secret: bytes, *parts: object) -> str:
    """HMAC-SHA256 of the parts joined by ``|`` (hex)."""
    return hmac.new(secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def missing_message(missing: Sequence[int], addresses: Sequence[str], timeout_s: float, *, who: str = "") -> str:
    """The one line a worker exits 76 with, naming each missing worker by rank and host:port.

    Example:
        >>> missing_message([1], ["a:1", "b:2"], 10)
        'start-up: worker 1 (b:2) did not join the rendezvous within 10 s (distribute.startup_timeout_s); nothing was trained; rerun (SLURM requeues on 76) once every worker can start'
    """
    names = ", ".join(f"{r} ({addresses[r]})" for r in missing)
    plural = "workers" if len(missing) > 1 else "worker"
    return (f"start-up: {plural} {names} did not join the rendezvous within {timeout_s:g} s "
            f"(distribute.startup_timeout_s){who}; nothing was trained; rerun (SLURM requeues on 76) once "
            f"every worker can start")


def _stopped(message: str) -> TrainingStopped:
    return TrainingStopped(message, EXIT_PEER_LOST)


# ----------------------------------------------------------------------------- the secret

def read_secret(path: Path, what: str) -> bytes:
    """The secret in ``path``, after checking that only this user can read it.

    Raises:
        UsageError: missing, not a regular file, someone else's, readable by group or others, or
            not a distrain secret. ``what`` names the setting that chose the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file: {path}") from None
    except OSError as err:
        raise UsageError(f"{what}: cannot read {path} ({err.strerror}; a symbolic link is not accepted)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what}: {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise UsageError(f"{what}: {path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise UsageError(f"{what}: {path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"chmod 600 it")
        text = os.read(fd, MAX_LINE).decode(errors="replace")
    finally:
        os.close(fd)
    return _parse_secret(text, path, what)


def _parse_secret(text: str, path: Path, what: str) -> bytes:
    line = text.strip()
    if line.startswith(_SECRET_PREFIX):
        line = line[len(_SECRET_PREFIX):]
    if len(line) < 32:
        raise UsageError(f"{what}: {path} holds no secret of at least 32 characters "
                         "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
    return line.encode()


def create_secret(run_dir: Path) -> bytes:
    """Worker 0: ``RUN_DIR/.rendezvous-secret``, created 0600 with ``O_EXCL`` unless it exists.

    An existing one (a resumed or requeued run) is reused after the same checks as any reader.
    """
    path = run_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return read_secret(path, "run dir")
    try:
        # One write of the whole line: a reader that sees the file half-written retries (_poll_secret).
        os.write(fd, f"{_SECRET_PREFIX}{secrets.token_hex(32)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return read_secret(path, "run dir")


def _poll_secret(path: Path, deadline: float, chief: str, timeout_s: float) -> bytes:
    """Other workers: the secret worker 0 creates, once it is there and complete."""
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n") and text.startswith(_SECRET_PREFIX):
            return read_secret(path, "run dir")
        if time.monotonic() >= deadline:
            raise _stopped(f"start-up: worker 0 ({chief}) did not create the rendezvous secret {path} within "
                           f"{timeout_s:g} s (distribute.startup_timeout_s): it did not start, or the run dir is "
                           f"not shared (then give every worker {SECRET_ENV}); nothing was trained")
        time.sleep(RETRY_S)


def secret_for(world: World, run_dir: Path, deadline: float, timeout_s: float,
               environ: Mapping[str, str] = os.environ) -> bytes:
    """This worker's copy of the job's secret (see the module docstring for where it comes from)."""
    given = environ.get(SECRET_ENV)
    if given:
        return read_secret(Path(given), SECRET_ENV)
    if world.is_chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        return create_secret(run_dir)
    return _poll_secret(run_dir / SECRET_FILE, deadline, world.worker_addresses[0], timeout_s)


# ----------------------------------------------------------------------------- line I/O

def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class _Lines:
    """Newline-delimited JSON from a socket, bounded in size and time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def feed(self) -> bool:
        """Reads what is available; False when the peer hung up (or sent nonsense)."""
        try:
            data = self.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self.buffer += data
        return len(self.buffer) <= MAX_LINE or b"\n" in self.buffer[:MAX_LINE]

    def pop(self) -> Optional[dict]:
        """The next complete message, None if there is none yet. Raises ValueError on a bad one."""
        if b"\n" not in self.buffer:
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("not an object")
        return message

    def read(self, deadline: float) -> Optional[dict]:
        """Blocking: the next message before ``deadline``; None on hang-up or time-out."""
        while True:
            message = self.pop()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(min(remaining, 1.0))
            try:
                data = self.sock.recv(MAX_LINE)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not data:
                return None
            self.buffer += data
            if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer:
                return None


# ----------------------------------------------------------------------------- worker 0

@dataclass
class _Peer:
    sock: socket.socket
    address: str
    lines: _Lines
    accepted: float
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    rank: Optional[int] = None  # set once authenticated


def _bind(world: World) -> socket.socket:
    host, port = split_address(world.worker_addresses[0])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        # IPv4 first, as TensorFlow's and Horovod's clients resolve it (gethostbyname).
        family, kind, proto, _, sockaddr = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    except (OSError, IndexError) as err:
        raise UsageError(f"environment: cannot resolve worker 0's address {host!r} ({err})") from None
    server = socket.socket(family, kind, proto)
    # TensorFlow's and Horovod's servers set SO_REUSEADDR too: the port is theirs right after us.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(sockaddr)
    except OSError as err:
        server.close()
        if err.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"environment: worker 0's address {host} is not an address of this machine "
                             f"(TF_CONFIG or the SLURM node address is wrong)") from None
        raise UsageError(f"distribute.port: cannot listen on {host}:{port} for the rendezvous ({err.strerror}); "
                         f"set distribute.port or DISTRAIN_PORT to a free port") from None
    server.listen(max(16, 2 * world.world_size))
    server.setblocking(False)
    return server


class _Server:
    """Worker 0's side: accept, authenticate, wait for every rank, then release them all."""

    def __init__(self, world: World, secret: bytes, timeout_s: float, deadline: float):
        self.world, self.secret, self.timeout_s, self.deadline = world, secret, timeout_s, deadline
        self.digest = world_digest(world.worker_addresses)
        self.server = _bind(world)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.server, selectors.EVENT_READ)
        self.peers: dict[socket.socket, _Peer] = {}
        self.joined: dict[int, _Peer] = {}

    def run(self) -> None:
        world = self.world
        log.info("rendezvous on %s: waiting up to %g s for %d worker(s)", world.worker_addresses[0], self.timeout_s,
                 world.world_size - 1)
        started = time.monotonic()
        try:
            while len(self.joined) < world.world_size - 1:
                now = time.monotonic()
                if now >= self.deadline:
                    self._abort()
                for peer in [p for p in self.peers.values() if p.rank is None and now - p.accepted > HANDSHAKE_S]:
                    self._drop(peer, "no answer to the challenge")
                for key, _ in self.selector.select(timeout=min(0.5, self.deadline - now)):
                    if key.fileobj is self.server:
                        self._accept()
                    elif key.fileobj in self.peers:
                        self._read(self.peers[key.fileobj])
            self._release()
            log.info("rendezvous: all %d workers present after %.1f s", world.world_size, time.monotonic() - started)
        finally:
            for peer in list(self.peers.values()):
                peer.sock.close()
            self.server.close()
            self.selector.close()

    def _abort(self) -> None:
        """The deadline passed: tell the workers who came who did not, and stop (exit 76)."""
        missing = [r for r in range(1, self.world.world_size) if r not in self.joined]
        for peer in self.joined.values():
            try:
                _send(peer.sock, {"abort": missing})
            except OSError:
                pass
        raise _stopped(missing_message(missing, self.world.worker_addresses, self.timeout_s))

    def _accept(self) -> None:
        try:
            sock, address = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        if len(self.peers) >= 4 * self.world.world_size + 16:  # a flood is not our peers
            sock.close()
            return
        peer = _Peer(sock, f"{address[0]}:{address[1]}", _Lines(sock), time.monotonic())
        self.peers[sock] = peer
        self.selector.register(sock, selectors.EVENT_READ)
        try:
            _send(sock, {"proto": PROTOCOL, "nonce": peer.nonce})
        except OSError:
            self._drop(peer)

    def _read(self, peer: _Peer) -> None:
        if not peer.lines.feed():
            if peer.rank is not None:
                log.warning("rendezvous: worker %d (%s) hung up before everyone arrived", peer.rank, peer.address)
            self._drop(peer)
            return
        try:
            while self.peers.get(peer.sock) is peer and (message := peer.lines.pop()) is not None:
                self._handle(peer, message)
        except (ValueError, UnicodeDecodeError):
            self._drop(peer, "not a distrain rendezvous request")

    def _drop(self, peer: _Peer, reason: Optional[str] = None) -> None:
        if reason:
            log.warning("rendezvous: refused %s: %s", peer.address, reason)
            try:
                _send(peer.sock, {"refused": reason})
            except OSError:
                pass
        self.selector.unregister(peer.sock)
        self.peers.pop(peer.sock, None)
        if peer.rank is not None and self.joined.get(peer.rank) is peer:
            del self.joined[peer.rank]
        peer.sock.close()

    def _handle(self, peer: _Peer, message: dict) -> None:
        world, secret = self.world, self.secret
        rank = message.get("rank")
        if peer.rank is not None:
            return  # nothing more is expected from a joined worker
        if not isinstance(rank, int) or not isinstance(message.get("nonce"), str) or "mac" not in message:
            return self._drop(peer, "not a distrain rendezvous request")
        expected = mac(secret, "join", peer.nonce, message["nonce"], rank, message.get("world"))
        if not hmac.compare_digest(str(message["mac"]), expected):
            return self._drop(peer, "wrong secret")
        if message.get("world") != self.digest:
            return self._drop(peer, f"its worker list differs from worker 0's {list(world.worker_addresses)}")
        if not 0 < rank < world.world_size:
            return self._drop(peer, f"rank {rank} is not a worker rank of a world of {world.world_size}")
        if rank in self.joined:  # a restarted worker: the newer connection wins
            self._drop(self.joined[rank])
        peer.rank = rank
        self.joined[rank] = peer
        _send(peer.sock, {"welcome": mac(secret, "welcome", message["nonce"], peer.nonce, rank),
                          "deadline_in": max(0.0, self.deadline - time.monotonic())})
        log.info("rendezvous: worker %d joined from %s (%d of %d)", rank, peer.address, len(self.joined),
                 world.world_size - 1)

    def _release(self) -> None:
        # Everyone is here. The listening socket goes first, so that whatever connects to this
        # port from now on reaches TensorFlow's (or Horovod's) server, never this one.
        self.selector.unregister(self.server)
        self.server.close()
        for peer in list(self.peers.values()):
            if peer.rank is None:
                self._drop(peer)
        for peer in self.joined.values():
            peer.sock.setblocking(True)
            try:
                _send(peer.sock, {"go": True})
            except OSError:
                pass  # it died just now: TensorFlow's collectives will say so
        _await_hang_up(list(self.joined.values()))


def _serve(world: World, secret: bytes, timeout_s: float, deadline: float) -> None:
    """Worker 0's side: accept, authenticate, wait for every rank, then release them all."""
    _Server(world, secret, timeout_s, deadline).run()


def _await_hang_up(peers: Sequence[_Peer], timeout: float = 5.0) -> None:
    """Waits for each worker to close first: the side that closes first keeps ``TIME_WAIT``,
    and it should be the worker's ephemeral port, not worker 0's port that TensorFlow binds next."""
    deadline = time.monotonic() + timeout
    for peer in peers:
        peer.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while peer.sock.recv(MAX_LINE):
                pass
        except OSError:
            pass
        peer.sock.close()


# ----------------------------------------------------------------------------- other workers

def _join(world: World, secret: bytes, timeout_s: float, deadline: float) -> None:
    """A worker's side: connect to worker 0 until the deadline, authenticate both ways, await go."""
    chief = world.worker_addresses[0]
    host, port = split_address(chief)
    digest = world_digest(world.worker_addresses)
    last_problem = "nothing listened on its port"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _stopped(missing_message([0], world.worker_addresses, timeout_s,
                                           who=f", seen from worker {world.rank}: {last_problem}"))
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, remaining))
        except OSError:
            time.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
            continue
        with sock:
            lines = _Lines(sock)
            hello = lines.read(min(deadline, time.monotonic() + HANDSHAKE_S))
            if not hello or hello.get("proto") != PROTOCOL or not isinstance(hello.get("nonce"), str):
                last_problem = "something else answers on its port"
                time.sleep(RETRY_S)
                continue
            nonce = secrets.token_hex(16)
            _send(sock, {"rank": world.rank, "nonce": nonce, "world": digest,
                         "mac": mac(secret, "join", hello["nonce"], nonce, world.rank, digest)})
            answer = lines.read(min(deadline, time.monotonic() + HANDSHAKE_S))
            if answer is None:
                last_problem = "it did not answer"
                continue
            if "refused" in answer:
                reason = str(answer["refused"])[:300]
                if reason.startswith("its worker list differs"):
                    raise UsageError(f"environment: worker 0 ({chief}) refused worker {world.rank}: {reason}; "
                                     "every worker needs the same TF_CONFIG cluster")
                raise UsageError(f"{SECRET_ENV}: worker 0 ({chief}) refused worker {world.rank}: {reason} "
                                 "(every worker must read the same secret)")
            if not hmac.compare_digest(str(answer.get("welcome", "")), mac(secret, "welcome", nonce, hello["nonce"],
                                                                            world.rank)):
                log.warning("rendezvous: the process on %s does not hold the job's secret; retrying", chief)
                last_problem = "the process on its port does not hold the job's secret"
                time.sleep(RETRY_S)
                continue
            log.info("rendezvous: joined worker 0 at %s; waiting for the others", chief)
            wait_until = time.monotonic() + max(remaining, float(answer.get("deadline_in", 0))) + GO_GRACE_S
            verdict = lines.read(wait_until)
            if verdict and verdict.get("go"):
                return  # closing first leaves TIME_WAIT on this side (see _await_hang_up)
            if verdict and isinstance(verdict.get("abort"), list):
                missing = [r for r in verdict["abort"] if isinstance(r, int) and 0 <= r < world.world_size]
                raise _stopped(missing_message(missing, world.worker_addresses, timeout_s,
                                               who=" (reported by worker 0)"))
            raise _stopped(f"start-up: worker 0 ({chief}) went away during the rendezvous; nothing was trained; "
                           "rerun (SLURM requeues on 76)")


# ----------------------------------------------------------------------------- entry point

def meet(world: World, run_dir: Path, timeout_s: float, *, environ: Mapping[str, str] = os.environ) -> None:
    """Returns once every worker of ``world`` is present, before any TensorFlow collective.

    Call it right before the strategy is built. Does nothing for a single process, or when the
    launcher gives no worker addresses (``horovodrun``, ``mpirun``).

    Args:
        world: this process's place; ``worker_addresses[0]`` is where the rendezvous listens.
        run_dir: the run dir every worker shares (where worker 0 keeps the secret).
        timeout_s: ``distribute.startup_timeout_s``, counted from this call.
        environ: where ``DISTRAIN_SECRET_FILE`` is read.

    Raises:
        TrainingStopped: exit 76, naming the workers that did not arrive (rank and host:port).
        UsageError: a secret file that others can read, worker 0's address not on this machine,
            its port taken, or a worker whose secret or worker list differs from worker 0's.
    """
    if world.world_size <= 1 or len(world.worker_addresses) != world.world_size:
        return
    deadline = time.monotonic() + timeout_s
    secret = secret_for(world, Path(run_dir), deadline, timeout_s, environ)
    if world.is_chief:
        _serve(world, secret, timeout_s, deadline)
    else:
        _join(world, secret, timeout_s, deadline)
