"""Sender transport: the training thread enqueues, a daemon thread owns the ZeroMQ PUSH socket.

Promises (tests/client_hooks/test_sender.py):
- `Sender.send` never blocks and never raises: when the bytes-bounded queue is full it drops
  the newest record and counts it (`dropped`).
- Sequence numbers are assigned on the sender thread when a frame is handed to ZeroMQ, so a
  record the sender dropped leaves no gap: the collector's gaps count what was lost after
  sending, the sender's `dropped` what never left. Together they are everything lost.
- The socket reconnects by itself (ZeroMQ) when the collector restarts.
- `close()` is bounded: drain for at most `timeout` seconds, send `bye` (sent/dropped),
  let ZeroMQ deliver for the rest of the time. A process whose collector is down exits
  within 2 s.
"""
from __future__ import annotations

import atexit
import collections
import os
import socket as _socket
import threading
import time
import warnings
from typing import Any, Callable, Optional, Union

from collector.wire import MAX_BATCH, MAX_FRAME_BYTES, Record, encode, encode_many

Payload = Union[dict, Callable[[], dict]]  # a callable is resolved on the sender thread

_ITEM_OVERHEAD = 160  # bytes charged per queued record on top of its estimated payload
# The sender thread sleeps IDLE_WAIT_S between rounds, then sends what piled up in one go (a
# record waits at most that long). Every wake-up takes the GIL, and a training thread bound
# by its host pays for each (the GIL handed over and back): a 10 ms poll (sixth and seventh
# sessions) woke it about once a step of the demo FNO on an H100, and waking it at each
# enqueue did no better. An enqueue wakes it early when the queue holds a frame's worth of
# records (WAKE_ITEMS: at 10k records/s, every ~6 ms, so the dashboard's latency budget
# holds) or more than WAKE_FRACTION of its bound (a burst); close() and flush() do too. A
# capture step queues one or two items (its packed record, the loss).
IDLE_WAIT_S = 0.05
NO_PEER_S = 10.0  # nothing taken for this long since the start: warn once (no collector there?)
WAKE_ITEMS = 64
WAKE_FRACTION = 0.25


def _count(data) -> int:
    """How many records a queued payload stands for: a packed capture's (client_hooks.capture),
    several; any other, one. Counts (sent, dropped) and sequence numbers go by records."""
    return getattr(data, "records", 1)


def _frames(recs: list[Record]) -> list[tuple[bytes, int]]:
    """A batched frame: the whole list in one encoder call when it fits in one frame (the
    usual case), else split by size."""
    if len(recs) <= MAX_BATCH:
        frame = encode(recs)
        if len(frame) <= MAX_FRAME_BYTES:
            return [(frame, len(recs))]
    return encode_many(recs, MAX_FRAME_BYTES)


NO_PEER_WHY = ("is a collector (`tensortap collect`) listening there? with CURVE keys, does it take this "
               "client's key?")


class Sender:
    """Push records to a collector at `endpoint` (e.g. tcp://127.0.0.1:5557).

    batch: most records per frame (1 = single-record frames).
    max_queue_bytes: bound of the in-process queue (estimated bytes); beyond it, drop newest.
    curve_server_key / curve_keypair: Z85 keys for a CURVE-authenticated endpoint.
    """

    def __init__(self, endpoint: str, run: str, rank: int = 0, world: int = 1, *,
                 batch: int = 256, max_queue_bytes: int = 32 << 20,
                 hello: Optional[dict] = None, curve_server_key: Optional[bytes] = None,
                 curve_keypair: Optional[tuple[bytes, bytes]] = None,
                 drop_report_s: float = 2.0):
        import zmq  # imported here: with the gate off, tensortap never imports zmq

        self.endpoint, self.run, self.rank, self.world = endpoint, run, rank, world
        self.batch = max(1, int(batch))
        self.max_queue_bytes = max_queue_bytes
        self.sent = 0
        self.dropped = 0
        self.reports = 0  # drop reports made (each is sent, or dropped and counted, like any record)
        self._seq = 0
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._wake = threading.Event()  # ends the sender thread's sleep early
        self._wake_bytes = int(max_queue_bytes * WAKE_FRACTION)
        self._close_deadline: Optional[float] = None
        self._closed = False
        self._drop_report_s = drop_report_s
        self._warned: set[str] = set()
        self._started = time.monotonic()
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUSH)
        # ~4k records in flight: what ZeroMQ still holds when close() gives up is lost
        # uncounted (the collector sees no later seq), so keep that tail short
        sock.setsockopt(zmq.SNDHWM, max(4, 4096 // self.batch))
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing on a dead connection: drop and count
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        if curve_server_key is not None:
            pub, sec = curve_keypair or zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve_server_key, pub, sec
        if "://[" in endpoint:  # an IPv6 address ([::1]): ZeroMQ takes it only with IPV6 on
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(endpoint)
        self._sock = sock
        self._zmq_again = zmq.Again
        info = {"pid": os.getpid(), "host": _socket.gethostname(), "world": world, **(hello or {})}
        self.send("events", "hello", info)
        self._thread = threading.Thread(target=self._run, name="tensortap-sender", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- training thread ------------------------------------------------------------------
    def send(self, kind: str, name: str, data: Payload, step: Optional[int] = None,
             epoch: Optional[int] = None, nbytes: int = 256, t: Optional[float] = None) -> bool:
        """Enqueue one record; O(1), never blocks, never raises. False when dropped.

        nbytes: estimated payload size, charged against the queue bound. t: wall time to
        stamp (default now; replay passes the original)."""
        size = nbytes + _ITEM_OVERHEAD
        with self._lock:  # uncontended: ~100 ns
            if self._closed or self._queued_bytes + size > self.max_queue_bytes:
                self.dropped += _count(data)
                return False
            self._queued_bytes += size
        self._queue.append((kind, name, step, epoch, t or time.time(), data, size))
        self._wake_if_due()
        return True

    def send_many(self, items: list, step: Optional[int] = None, epoch: Optional[int] = None) -> int:
        """Enqueue (kind, name, data, nbytes) records of one step at once: one lock, and the
        sender thread sees them together (one frame, not a few small ones). Records beyond
        the queue bound are dropped and counted, as in `send`. Returns how many were queued."""
        t = time.time()
        sizes = [nb + _ITEM_OVERHEAD for _, _, _, nb in items]
        with self._lock:
            if self._closed:
                self.dropped += sum(_count(it[2]) for it in items)
                return 0
            room, keep = self.max_queue_bytes - self._queued_bytes, 0
            while keep < len(items) and sizes[keep] <= room:
                room -= sizes[keep]
                keep += 1
            self.dropped += sum(_count(it[2]) for it in items[keep:])
            self._queued_bytes += sum(sizes[:keep])
        self._queue.extend([(k, n, step, epoch, t, d, sz) for (k, n, d, _), sz in zip(items[:keep], sizes)])
        self._wake_if_due()
        return keep

    def _wake_if_due(self) -> None:
        """Wake the sender thread before its round when a frame's worth or a burst is queued."""
        if len(self._queue) >= WAKE_ITEMS or self._queued_bytes > self._wake_bytes:
            self._wake.set()

    # -- sender thread --------------------------------------------------------------------
    def _take(self) -> list:
        items = []
        q = self._queue
        while q and len(items) < self.batch:
            items.append(q.popleft())
        if items:
            with self._lock:
                self._queued_bytes -= sum(it[6] for it in items)
        return items

    def _records(self, items: list) -> list[tuple[Record, int]]:
        """(record, how many records it stands for: a packed one, several) per item."""
        recs = []
        for kind, name, step, epoch, t, data, _ in items:
            n = _count(data)
            if callable(data):
                try:
                    data = data()  # e.g. waits on a CUDA event, then reads a pinned buffer
                except Exception as e:  # telemetry never raises into training
                    self._warn_once("payload", f"tensortap: a statistic could not be read ({e!r}); dropping it")
                    with self._lock:  # send() updates it too, from the training thread
                        self.dropped += n
                    continue
            recs.append((Record(v=1, run=self.run, rank=self.rank, world=self.world, seq=0, t=t,
                                kind=kind, name=name, step=step, epoch=epoch, data=data), n))
        return recs

    def _send_records(self, recs: list[tuple[Record, int]], deadline: Optional[float]) -> None:
        """Sequence numbers go by records: a packed record of n takes seq .. seq + n - 1."""
        if not recs:
            return
        first = self._seq
        for r, n in recs:
            r.seq = self._seq
            self._seq += n
        try:
            frames = [(encode(recs[0][0]), 1)] if len(recs) == 1 else _frames([r for r, _ in recs])
        except Exception:  # a value JSON cannot hold: drop that record alone, number the rest
            self._seq = first
            kept = self._encodable(recs)
            if len(kept) < len(recs):
                self._send_records(kept, deadline)
            else:  # each encodes alone, the frame not (never seen): dropped, not tried again
                self._warn_once("encode", "tensortap: a frame could not be encoded; dropping its records")
                with self._lock:
                    self.dropped += sum(n for _, n in recs)
            return
        done = sent_objs = 0
        for frame, k in frames:
            n = sum(c for _, c in recs[sent_objs:sent_objs + k])
            if not self._send_frame(frame, deadline):
                # give back the unsent seqs: what never left is 'dropped', not a gap
                lost = self._seq - first - done
                self._seq = first + done
                with self._lock:
                    self.dropped += lost
                return
            sent_objs += k
            done += n
            self.sent += n

    def _encodable(self, recs: list[tuple[Record, int]]) -> list[tuple[Record, int]]:
        """The records that encode alone; the others are dropped and counted (the entry
        points check what users hand them, so this is a last guard: the thread lives on)."""
        keep = []
        for r, n in recs:
            try:
                encode(r)
                keep.append((r, n))
            except Exception as e:
                self._warn_once("encode", f"tensortap: a {r.kind} record '{r.name}' could not be encoded "
                                          f"({e}); dropping it")
                with self._lock:
                    self.dropped += n
        return keep

    def _send_frame(self, frame: bytes, deadline: Optional[float]) -> bool:
        """Try to hand a frame to ZeroMQ, retrying while the peer is away or full.

        The training thread is never involved: while this waits, new records pile up in the
        bytes-bounded queue and the newest are dropped there once it is full."""
        import zmq
        while True:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                return True
            except self._zmq_again:
                if not self.sent and time.monotonic() - self._started >= NO_PEER_S:
                    self._warn_once("no peer", f"tensortap: nothing has taken a record at {self.endpoint} for "
                                    f"{NO_PEER_S:g} s: {NO_PEER_WHY}; records wait up to "
                                    f"{self.max_queue_bytes >> 20} MiB, then are dropped and counted")
            except zmq.ZMQError as e:
                self._warn_once("zmq", f"tensortap: send failed ({e}); dropping records")
                return False
            dl = deadline if deadline is not None else self._close_deadline
            if dl is not None and time.monotonic() >= dl:
                return False
            self._sock.poll(5, zmq.POLLOUT)  # wakes as soon as there is room (or 5 ms)

    def _run(self) -> None:
        last_report, reported = time.monotonic(), 0
        while not self._closing.is_set():
            self._wake.clear()
            items = self._take()
            if items:
                try:
                    self._send_records(self._records(items), None)
                except Exception as e:  # never seen; the thread must outlive it all the same
                    self._warn_once("thread", f"tensortap: the sender failed ({e!r}); dropping its records")
                    with self._lock:
                        self.dropped += sum(_count(it[5]) for it in items)
            if len(items) < self.batch:  # the queue is empty: sleep (else on with the next batch)
                self._wake.wait(min(IDLE_WAIT_S, self._drop_report_s))
            now = time.monotonic()
            if self.dropped != reported and now - last_report >= self._drop_report_s:
                reported, last_report = self.dropped, now
                self.reports += 1
                self._send_records(self._records([self._event("drops")]), now + 0.05)

    def _event(self, name: str) -> tuple:
        return ("events", name, None, None, time.time(), {"sent": self.sent, "dropped": self.dropped}, 0)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            try:
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            except Exception:  # a warnings filter set to "error" must not reach training either
                pass

    # -- shutdown -------------------------------------------------------------------------
    def flush(self, timeout: float = 1.0) -> bool:
        """Wait (bounded) until the queue is empty. For tests and epoch ends; never required."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._queue and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._queue

    def close(self, timeout: float = 1.0) -> None:
        """Drain for at most `timeout` s, send bye with sent/dropped, then let ZeroMQ deliver
        what it holds for what is left of `timeout` + 0.5 s (at least 0.3 s). With no
        collector connected nothing is held, so this returns at once."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True  # later send() calls drop and count
        self._close_deadline = deadline  # bounds the frame the thread may be retrying
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=timeout + 0.1)
        while self._queue and time.monotonic() < deadline:
            self._send_records(self._records(self._take()), deadline)
        left = sum(_count(it[5]) for it in list(self._queue))  # (a thread still in a callable may pop)
        self._queue.clear()
        with self._lock:
            self.dropped += left
        if not self.sent and self.dropped:
            self._warn_once("none sent", f"tensortap: no record of run {self.run} was taken at {self.endpoint} "
                            f"({self.dropped} dropped): {NO_PEER_WHY}")
        bye = self._records([self._event("bye")])
        self._send_records(bye, max(deadline, time.monotonic() + 0.2))
        linger_s = max(0.3, deadline + 0.5 - time.monotonic())
        self._sock.close(linger=int(linger_s * 1000))
        self._ctx.term()
        atexit.unregister(self.close)

    def stats(self) -> dict[str, Any]:
        """Counts; cpu_s: the sender thread's CPU time so far (None once it has ended)."""
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))
        except (AttributeError, OSError, TypeError):  # ended, or not Linux
            cpu = None
        return {"sent": self.sent, "dropped": self.dropped, "queued_bytes": self._queued_bytes,
                "queued": len(self._queue), "cpu_s": cpu}
