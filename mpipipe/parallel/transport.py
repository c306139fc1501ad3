"""One transport policy for every message that leaves a rank: point-to-point and collectives.

Host (NumPy) buffers go to MPI as they are. Device (CuPy) buffers go

- to a CUDA-aware MPI directly, but only once the work queued before the hand-off has finished
  (MPI knows nothing of CUDA streams): the request records an event on the compute stream and
  is posted when that event has completed;
- through pinned host buffers otherwise: a side stream copies device -> host after the compute
  stream's work, MPI moves the host buffer, a side stream copies host -> device once the compute
  stream no longer uses the target, and the compute stream waits for that copy (an event wait,
  no host synchronisation) before its next kernel.

Nothing here blocks to move a device request along: `progress()` (called between the
executor's actions and inside every wait) advances each request in flight as far as it can.
Host sends are also tested by a helper thread until they complete (`_push`): an MPI library
moves a large message only inside MPI calls, and the sender's next call would otherwise come
after its next compute action.
Collectives on one communicator are posted in the order they were asked for, the same order on
every rank, whatever order their copies finish in. Point-to-point messages travel as raw bytes
(MPI.BYTE), so every dtype works on every MPI (float16 and bfloat16 have no MPI datatype before
MPI 4.1). Which path a buffer takes is decided here and nowhere else; the device work behind it
(events, copies, pinned memory) is the `DeviceOps` of parallel/staging.py, so the policy is
tested on CPUs with a fake device.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

from mpipipe.parallel.p2p import Link, Reposted
from mpipipe.parallel.staging import DeviceOps, Event, HostOps, HostPool
from mpipipe.xp import Array, is_half


class Request:
    """A message or collective in flight: one MPI request, perhaps with device copies before and
    after it. `Test()` (MPI's name, so waits treat both alike) never blocks."""

    def __init__(
        self,
        transport: Transport,
        ready: Event | None,
        post: Callable[[], MPI.Request],
        land: Callable[[], Event] | None = None,
        release: Callable[[], None] | None = None,
        queue: deque[Request] | None = None,
    ) -> None:
        self.transport, self.ready, self.post = transport, ready, post
        self.land, self.release, self.queue = land, release, queue
        self.mpi: MPI.Request | None = None
        self.landing: Event | None = None
        self.done = False
        if queue is not None:
            queue.append(self)

    def advance(self) -> bool:
        """One non-blocking step: post once ready (and first in its queue), then complete."""
        if self.done:
            return True
        ops = self.transport.ops
        if self.mpi is None:
            if self.ready is not None and not ops.done(self.ready):
                return False
            if self.queue is not None:
                if self.queue[0] is not self:
                    return False
                self.queue.popleft()
            self.mpi = self.post()
        if self.landing is None:
            if not self.mpi.Test():
                return False
            if self.land is not None:
                self.landing = self.land()
        if self.landing is not None:
            if not ops.done(self.landing):
                return False
            ops.join(self.landing)  # the compute stream waits for the copy: no host sync
        if self.release is not None:
            self.release()
        self.done = True
        return True

    def Test(self) -> bool:  # noqa: N802 - the MPI name
        return self.transport.test(self)


SPIN_OWN_CORE_S = 1e-3  # a sleep costs ~60 us (timer slack): more than a small message's trip
SPIN_SHARED_S = 5e-5  # ranks sharing cores: spinning would take the core of the rank awaited


def spin_for(local_size: int, cores: int | None = None) -> float:
    """How long a wait spins before it sleeps, for one of `local_size` ranks on a node: long
    (1 ms) when every rank has a core of its own, so a small message is received at once rather
    than after a sleep (the 64-byte round trip: 99 us against MPI's 8 us with the short spin),
    short when ranks share cores (a spinning rank would steal the core of the rank it waits
    for: a 4-rank step on 2 cores took twice as long)."""
    own_core = local_size <= (cores or os.cpu_count() or 1)
    return SPIN_OWN_CORE_S if own_core else SPIN_SHARED_S


# the send helper's longest sleep between tests: a stalled message waits at most about this
# long for its sender, and a rank whose sends wait for a busy receiver pays a test this often.
# 4 ranks of real compute on 2 cores, 30 steps of the default model, alternating: 15.9 and
# 16.3 s with it against 16.1 and 15.7 s without the helper; with 0.2 ms, 16.5 and 16.3 against
# 16.0 and 15.8 (3% more CPU)
PUSH_MAX_SLEEP_S = 1e-3


class Transport:
    """Decides, once, how each buffer travels (see the module docstring)."""

    def __init__(
        self,
        ops: DeviceOps | None = None,
        aware: bool = False,
        max_sleep_s: float = 2e-4,
        spin_s: float = 5e-5,
    ) -> None:
        """`spin_s`: how long a wait spins before backing off to sleeps; `spin_for` gives the
        runtime's choice."""
        self.ops: DeviceOps = ops if ops is not None else HostOps()
        self.aware = aware
        self.pool = HostPool(self.ops)
        self.max_sleep_s, self.spin_s = max_sleep_s, spin_s
        self.lock = threading.RLock()  # the executor and the reducer's progress thread
        self.inflight: list[Request] = []
        self.queues: dict[int, deque[Request]] = {}  # collectives per communicator, in order
        self.persistent: list[MPI.Prequest] = []  # freed by close()
        # host sends not yet complete, which a helper thread tests while the rank computes
        self.sends: list[MPI.Request] = []
        self.sending = threading.Event()  # set while `sends` is not empty
        self.closed = False
        self.fresh = False  # a send was queued since the helper last looked
        self.pusher: threading.Thread | None = None

    @property
    def policy(self) -> str:
        """What device buffers do: 'host' (no device), 'direct' (CUDA-aware) or 'staged'."""
        if not self.ops.has_device:
            return "host"
        return "direct" if self.aware else "staged"

    def link(self, comm: MPI.Comm) -> Link:
        """Point-to-point messages on `comm` under this policy."""
        return Link(self, comm)

    # -- point to point ------------------------------------------------------------------------
    def isend(self, comm: MPI.Comm, buf: Array, dest: int, tag: int) -> Any:
        if not self.ops.is_device(buf):
            req = comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag)
            self._push(req)
            return req
        if self.aware:
            ready = self.ops.mark()
            return self._track(
                Request(self, ready, lambda: comm.Isend([buf, MPI.BYTE], dest, tag))
            )
        host = self.pool.take(buf.shape, buf.dtype)
        copied = self.ops.to_host(buf, host, self.ops.mark())
        return self._track(
            Request(
                self,
                copied,
                lambda: comm.Isend([host, MPI.BYTE], dest, tag),
                release=lambda: self.pool.give(host),
            )
        )

    def irecv(self, comm: MPI.Comm, buf: Array, source: int, tag: int) -> Any:
        if not self.ops.is_device(buf):
            return comm.Irecv([buf, MPI.BYTE], source=source, tag=tag)
        free = self.ops.mark()  # queued kernels may still read the buffer we receive into
        if self.aware:
            return self._track(
                Request(self, free, lambda: comm.Irecv([buf, MPI.BYTE], source, tag))
            )
        host = self.pool.take(buf.shape, buf.dtype)
        return self._track(
            Request(
                self,
                None,
                lambda: comm.Irecv([host, MPI.BYTE], source, tag),
                land=lambda: self.ops.to_device(host, buf, free),
                release=lambda: self.pool.give(host),
            )
        )

    def recv_init(self, comm: MPI.Comm, buf: Array, source: int, tag: int) -> Reposted:
        """A receive into `buf` from `source` with `tag`, to be posted again and again
        (`Reposted.start`): an MPI persistent request for a host buffer, `irecv` at each start
        for a device buffer."""
        if self.ops.is_device(buf):
            return Reposted(lambda: self.irecv(comm, buf, source, tag))
        req = comm.Recv_init([buf, MPI.BYTE], source=source, tag=tag)
        self.persistent.append(req)
        return Reposted(None, req)

    def _push(self, req: MPI.Request) -> None:
        """Have the helper thread test host send `req` until it completes. An MPI library moves
        a message only inside MPI calls: a large one whose receiver is ready can wait for the
        sender's next call, and the executor's next call comes after its next compute action
        (MPICH without its single-copy path, MPIR_CVAR_CH4_CMA_ENABLE=0, 8 emulated ranks of
        5 ms actions: 1F1B's step 2.0x the simulated one and ZB-V's 3.2x; with this helper 1.18
        and 1.86, with its longest sleep 0.2 ms instead of PUSH_MAX_SLEEP_S 1.11 and 1.53, and
        1.02-1.03 and 1.10-1.13 with the single-copy path, with or without the helper). Needs
        MPI_THREAD_MULTIPLE (mpi4py's default); without it, the executor's progress calls
        between actions remain the only ones."""
        if self.closed:
            return
        if self.pusher is None:
            if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
                return
            self.pusher = threading.Thread(target=self._push_sends, daemon=True)
            self.pusher.start()
            # Python's atexit handlers run before mpi4py's MPI_Finalize (a C-level Py_AtExit)
            atexit.register(self._stop_pusher)
        with self.lock:
            if req.Test():  # done already (a small message): no need to wake the helper
                return
            self.sends.append(req)
            self.fresh = True  # the helper's back-off starts again from its shortest sleep
            self.sending.set()

    def _push_sends(self) -> None:
        """The helper thread: while host sends are in flight, test them with a back-off sleep
        (NumPy's kernels and the emulated compute's sleeps release the GIL), under the lock
        that every test of a plain request takes (MPI forbids two threads testing one request
        at once)."""
        while not self.closed:
            self.sending.wait()
            sleep = 2e-5
            while not self.closed:
                with self.lock:
                    try:
                        self.sends = [r for r in self.sends if not r.Test()]
                    except Exception:  # an MPI error: the executor's own test will raise it
                        self.closed, self.sends = True, []
                        self.sending.clear()
                        return
                    if not self.sends:
                        self.sending.clear()
                        break
                    if self.fresh:
                        sleep, self.fresh = 2e-5, False
                time.sleep(sleep)
                sleep = min(2 * sleep, PUSH_MAX_SLEEP_S)

    def _stop_pusher(self) -> None:
        """End the send helper (at close, or at exit after a failure skipped close: no thread
        may test a request while MPI finalizes)."""
        self.closed = True  # no send is queued after this
        if self.pusher is not None:
            self.sending.set()
            self.pusher.join()
            self.pusher = None
            atexit.unregister(self._stop_pusher)  # and let the transport be collected

    def close(self) -> None:
        """Stop the send helper; free the persistent requests (MPI warns of any left at
        finalize)."""
        self._stop_pusher()
        for req in self.persistent:
            if req != MPI.REQUEST_NULL:
                req.Free()
        self.persistent.clear()

    # -- collectives ---------------------------------------------------------------------------
    def iallreduce(self, comm: MPI.Comm, buf: Array, op: MPI.Op = MPI.SUM) -> Request:
        """In-place reduction (SUM unless `op`) of `buf` over `comm`, started in call order on
        every rank."""
        return self._collective(
            comm, buf, buf, lambda s, r: comm.Iallreduce(MPI.IN_PLACE, r, op=op), "all-reduce"
        )

    def ireduce_scatter(
        self, comm: MPI.Comm, send: Array, recv: Array, op: MPI.Op = MPI.SUM
    ) -> Request:
        """`recv` (send.size / comm size elements) gets block `rank` of the reduction of `send`
        over `comm` (MPI_Reduce_scatter_block), started in call order on every rank."""
        self._blocks(comm, send, recv, "reduce-scatter")
        return self._collective(
            comm,
            send,
            recv,
            lambda s, r: comm.Ireduce_scatter_block(s, r, op=op),
            "reduce-scatter",
        )

    def iallgather(self, comm: MPI.Comm, send: Array, recv: Array) -> Request:
        """`recv` (comm size x send.size elements) gets every rank's `send`, in rank order
        (MPI_Allgather), started in call order on every rank. Raw bytes: any dtype."""
        self._blocks(comm, recv, send, "all-gather")
        return self._collective(
            comm, send, recv, lambda s, r: comm.Iallgather([s, MPI.BYTE], [r, MPI.BYTE]), None
        )

    def allreduce_now(
        self, comm: MPI.Comm, buf: Array, op: MPI.Op = MPI.SUM, spin_s: float | None = None
    ) -> None:
        """An in-place reduction whose result the caller needs at once (tensor parallelism),
        waited for by polling. A host array is posted to MPI at once, without a tracked
        request: the caller waits for it before issuing anything else on `comm`, so there is no
        order to keep, and the request bookkeeping would double the latency of small messages.
        A device array takes `iallreduce`'s path (directly after its kernels, or staged).
        `spin_s`: how long to spin before backing off (default the transport's)."""
        if self.ops.is_device(buf):
            self.wait(self.iallreduce(comm, buf, op), spin_s)
            return
        self.wait(comm.Iallreduce(MPI.IN_PLACE, buf, op=op), spin_s)

    def reduce_scatter_now(
        self,
        comm: MPI.Comm,
        send: Array,
        recv: Array,
        op: MPI.Op = MPI.SUM,
        spin_s: float | None = None,
    ) -> None:
        """`ireduce_scatter`, waited for at once (as `allreduce_now`, host arrays untracked)."""
        if self.ops.is_device(send):
            self.wait(self.ireduce_scatter(comm, send, recv, op), spin_s)
            return
        self._blocks(comm, send, recv, "reduce-scatter")
        self._refuse_half(send, "reduce-scatter")
        self.wait(comm.Ireduce_scatter_block(send, recv, op=op), spin_s)

    def allgather_now(
        self, comm: MPI.Comm, send: Array, recv: Array, spin_s: float | None = None
    ) -> None:
        """`iallgather`, waited for at once (as `allreduce_now`, host arrays untracked)."""
        if self.ops.is_device(send):
            self.wait(self.iallgather(comm, send, recv), spin_s)
            return
        self._blocks(comm, recv, send, "all-gather")
        self.wait(comm.Iallgather([send, MPI.BYTE], [recv, MPI.BYTE]), spin_s)

    def _collective(
        self,
        comm: MPI.Comm,
        send: Array,
        recv: Array,
        call: Callable[[Any, Any], MPI.Request],
        reduces: str | None,
    ) -> Request:
        """One collective from `send` into `recv` (the same array when in place) under the
        policy: host arrays as they are; device arrays directly once their kernels have run
        (CUDA-aware MPI), else staged through pinned host buffers and copied back after."""
        if reduces is not None:
            self._refuse_half(send, reduces)
        queue = self.queues.setdefault(id(comm), deque())
        if not self.ops.is_device(send):
            return self._track(Request(self, None, lambda: call(send, recv), queue=queue))
        ready = self.ops.mark()
        if self.aware:
            return self._track(Request(self, ready, lambda: call(send, recv), queue=queue))
        hsend = self.pool.take(send.shape, send.dtype)
        hrecv = hsend if recv is send else self.pool.take(recv.shape, recv.dtype)

        def release() -> None:
            self.pool.give(hsend)
            if hrecv is not hsend:
                self.pool.give(hrecv)

        return self._track(
            Request(
                self,
                self.ops.to_host(send, hsend, ready),
                lambda: call(hsend, hrecv),
                land=lambda: self.ops.to_device(hrecv, recv, ready),
                release=release,
                queue=queue,
            )
        )

    @staticmethod
    def _refuse_half(buf: Array, what: str) -> None:
        if is_half(buf.dtype):
            raise TypeError(
                f"{what} of {buf.dtype}: reduce 16-bit floats in a float32 copy (MPI "
                "before 4.1 has no 16-bit float type, and float32 sums are more accurate)"
            )

    @staticmethod
    def _blocks(comm: MPI.Comm, whole: Array, block: Array, what: str) -> None:
        if whole.size != block.size * comm.Get_size() or whole.dtype != block.dtype:
            raise ValueError(
                f"{what} over {comm.Get_size()} ranks needs a whole buffer of {comm.Get_size()} "
                f"x the block's size and dtype: got {whole.size} {whole.dtype} and "
                f"{block.size} {block.dtype} (pad the whole buffer to a multiple of the ranks)"
            )

    def allreduce(self, comm: MPI.Comm, host: Any, op: MPI.Op = MPI.SUM) -> None:
        """An in-place reduction of a small host array (the step's statistics), waited for as
        every wait here is (`wait`): the first rank to finish its step would otherwise spin in
        MPI's blocking all-reduce until the last one gets there, on the core that rank may need
        (4 ranks on 2 cores, 40 default steps: system time 3.3-3.8 -> 1.3-1.7 s, wall time
        unchanged within the runs' spread)."""
        self.wait(comm.Iallreduce(MPI.IN_PLACE, host, op=op))

    # -- progress and waiting ------------------------------------------------------------------
    def _track(self, req: Request) -> Request:
        with self.lock:
            self.inflight.append(req)
            req.advance()
        return req

    def progress(self) -> None:
        """Advance every request in flight as far as it goes without blocking."""
        if not self.inflight:
            return
        with self.lock:
            self.inflight = [r for r in self.inflight if not r.advance()]

    def test(self, req: Any) -> bool:
        if isinstance(req, Request):
            self.progress()
            return req.done
        with self.lock:  # the send helper may be testing it (see _push)
            return bool(req.Test())

    def wait(self, req: Any, spin_s: float | None = None) -> None:
        """Spin on `test` for `spin_s`, then poll with a back-off sleep: MPICH busy-spins in a
        blocking wait, which on an oversubscribed node steals the cores that computing ranks
        need; the back-off caps the added latency at `max_sleep_s`."""
        if self.test(req):
            return
        deadline = time.perf_counter() + (self.spin_s if spin_s is None else spin_s)
        while time.perf_counter() < deadline:
            if self.test(req):
                return
        sleep = 1e-5
        while not self.test(req):
            time.sleep(sleep)
            sleep = min(2 * sleep, self.max_sleep_s)

    def waitall(self, reqs: list[Any]) -> None:
        for r in reqs:
            self.wait(r)

    @property
    def idle(self) -> bool:
        """Nothing in flight and no collective waiting to be posted (so every staging buffer
        is back in its pool)."""
        return not self.inflight and not any(q for q in self.queues.values())
