"""The rank group's wire: torch.distributed's gloo over a TCP store, on a process group of
our own (vLLM's default group, if any, stays untouched).

Every operation but one waits at most ``VLLM_NEURONX_RANK_TIMEOUT`` seconds for the
other ranks, so a rank that hangs fails the others within it; a rank that dies closes
its connections and fails them at once. The one exception is a follower waiting for
the leader's next call (``receive``): a server may idle for hours, and it learns of the
leader's end from its closed connection.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
import time
import uuid

import torch
import torch.distributed as dist

from vllm_neuronx import envs
from vllm_neuronx.distributed import shm
from vllm_neuronx.distributed.topology import Topology, split_address
from vllm_neuronx.log import get_logger

logger = get_logger(__name__)

# A call's first broadcast carries its length and up to this many bytes (a decode step's
# inputs fit); a larger call sends the rest in a second one.
HEADER_BYTES = 1 << 15
FOREVER = datetime.timedelta(days=3650)
# Start-up (connecting, loading, compiling on the other ranks) may take this many
# timeouts.
START_FACTOR = 10


class RankFailure(RuntimeError):
    """Another rank failed, hung or left: the group cannot run the model any more."""


def rank_timeout() -> datetime.timedelta:
    seconds = float(envs.VLLM_NEURONX_RANK_TIMEOUT)
    if seconds <= 0:
        raise ValueError(f"VLLM_NEURONX_RANK_TIMEOUT={seconds} must be > 0 seconds")
    return datetime.timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> tuple:
    """What tells this machine from another: the hostname, the boot (hosts or containers
    may share a hostname) and the network namespace (a node of its own as far as the
    network goes, as the tests' second node is)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        net = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        boot, net = "", 0
    return socket.gethostname(), boot, net


def _device(master_host: str, master_port: int):
    """Gloo's transport on the address this machine reaches the master from. Gloo's
    default is the address of this machine's hostname, which need not be on the network
    the nodes share (a second interface, a network namespace); GLOO_SOCKET_IFNAME, where
    set, still names the interface."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_default_device()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_host, master_port))  # no packet: only picks the route
            local = s.getsockname()[0]
        except OSError:
            return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=local)


class RankGroup:
    """One process's membership: collectives over every rank (the CPU backend's
    ``Collective``), and the leader's calls to the followers."""

    def __init__(self, topology: Topology, master: str) -> None:
        self.rank, self.world = topology.rank, topology.world
        self.timeout = rank_timeout()
        host, port = split_address(master)
        start = self.timeout * START_FACTOR
        try:
            self.store = dist.TCPStore(host, port, self.world, self.rank == 0, timeout=start)
            options = dist.ProcessGroupGloo._Options()
            options._timeout = start
            options._devices = [_device(host, port)]
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("vllm_neuronx", self.store),
                                            self.rank, self.world, options)
        except Exception as e:
            raise RankFailure(f"rank {self.rank} of {self.world} could not join the group at "
                              f"{master}: {e}") from None
        self._header = torch.empty(HEADER_BYTES + 8, dtype=torch.uint8)
        self.shared = self._shared_memory()

    def _shared_memory(self) -> shm.SharedMemoryCollective | None:
        """Collectives through shared memory when every rank runs on this machine."""
        here = (_machine(), shm.usable(self.world))
        every = self.all_gather_object((here, os.getpid()), timeout=self.timeout * START_FACTOR)
        if any(h != here or not h[1] for h, _ in every):
            return None
        path = f"/dev/shm/vllm-neuronx-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.rank == 0:
            shm.SharedMemoryCollective.create(path, self.world)
        path = self.all_gather_object(path if self.rank == 0 else None,
                                      timeout=self.timeout * START_FACTOR)[0]
        try:
            shared = shm.SharedMemoryCollective(path, self.rank, self.world,
                                                [pid for _, pid in every],
                                                self.timeout.total_seconds())
        finally:  # once every rank has mapped it, the file need not outlive them
            self.all_gather_object(None, timeout=self.timeout * START_FACTOR)
            if self.rank == 0:
                os.unlink(path)
        return shared

    @property
    def transport(self) -> str:
        """What the collectives go through, for the start-up log."""
        return "shared memory" if self.shared is not None else "gloo"

    # -- the CPU backend's collective -------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.shared is not None and x.is_contiguous():
            return self._local(self.shared.all_reduce, x, "all-reduce")
        self._wait(self.pg.allreduce(x, dist.ReduceOp.SUM, self.timeout), "all-reduce")
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` side by side along the last dimension, in rank order."""
        x = x.contiguous()
        if self.shared is not None and self.shared.fits_gather(x):
            return self._local(self.shared.all_gather, x, "all-gather")
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._wait(self.pg.allgather([parts], [x]), "all-gather")
        return torch.cat(parts, dim=-1)

    def _local(self, op, x: torch.Tensor, what: str) -> torch.Tensor:
        try:
            return op(x)
        except (shm.RankGone, shm.RankHung) as e:
            raise RankFailure(f"rank {self.rank}: {what} across {self.world} ranks failed: "
                              f"{e}") from None

    def _wait(self, work, what: str, timeout: datetime.timedelta | None = None) -> None:
        try:
            work.wait(timeout or self.timeout)
        except Exception as e:
            raise RankFailure(f"rank {self.rank}: {what} across {self.world} ranks failed "
                              f"(a rank died, hung past VLLM_NEURONX_RANK_TIMEOUT="
                              f"{self.timeout.total_seconds():g} s, or left): {e}") from None

    # -- objects ---------------------------------------------------------------------
    def send(self, obj) -> None:
        """The leader's broadcast of a call (any picklable object) to every follower."""
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else \
            torch.empty(0, dtype=torch.uint8)
        header = self._header
        header[:8].view(torch.int64)[0] = len(payload)
        first = min(len(payload), HEADER_BYTES)
        header[8:8 + first] = data[:first]
        self._wait(self.pg.broadcast(header, 0), "sending a call")
        if len(payload) > HEADER_BYTES:
            self._wait(self.pg.broadcast(data[HEADER_BYTES:].clone(), 0), "sending a call")

    def receive(self):
        """A follower's wait for the leader's next call (as long as it takes)."""
        header = self._header
        try:
            self.pg.broadcast(header, 0).wait(FOREVER)
        except Exception as e:
            raise RankFailure(f"rank {self.rank}: the leader (rank 0) is gone: {e}") from None
        size = int(header[:8].view(torch.int64)[0])
        payload = bytearray(header[8:8 + min(size, HEADER_BYTES)].numpy().tobytes())
        if size > HEADER_BYTES:
            rest = torch.empty(size - HEADER_BYTES, dtype=torch.uint8)
            self._wait(self.pg.broadcast(rest, 0), "receiving a call")
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)

    def all_gather_object(self, obj, *, timeout: datetime.timedelta | None = None) -> list:
        """Every rank's ``obj``, in rank order (small objects: start-up checks)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._wait(self.pg.allgather([sizes], [torch.tensor([payload.numel()])]),
                   "exchanging settings", timeout)
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:payload.numel()] = payload
        parts = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world)]
        self._wait(self.pg.allgather([parts], [padded]), "exchanging settings", timeout)
        return [pickle.loads(p[:int(s.item())].numpy().tobytes())
                for p, s in zip(parts, sizes, strict=True)]

    def agree(self, failed: bool) -> list[int]:
        """The end of a step: the ranks that failed it (every rank learns all of them)."""
        flags = torch.zeros(self.world, dtype=torch.int32)
        flags[self.rank] = int(failed)
        self.all_reduce(flags)
        return flags.nonzero().flatten().tolist()


class LocalRanks:
    """The followers a leader starts on its own machine (the CPU backend's ranks, when no
    launcher started them): killed with it (PR_SET_PDEATHSIG), reaped when it closes."""

    def __init__(self, world: int, master: str, settings_file: str) -> None:
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, world):
            env = dict(os.environ, VLLM_NEURONX_RANK=str(rank),
                       VLLM_NEURONX_WORLD_SIZE=str(world), VLLM_NEURONX_MASTER=master)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "vllm_neuronx.distributed.follower",
                 "--settings", settings_file],
                env=env, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL))

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit status) of every follower that has exited."""
        return [(r + 1, p.returncode) for r, p in enumerate(self.procs)
                if p.poll() is not None]

    def close(self, grace: float = 10.0) -> None:
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the leader's thread that started it ends."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
