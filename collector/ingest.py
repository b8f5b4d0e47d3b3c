"""ZeroMQ ingest: PULL socket -> validate -> per-rank accounting -> write chunks + index.

Two threads: the ingest thread (this module's `Ingest.run`) owns the socket and the per-rank
sequence accounting; the writer thread (`Ingest.write_loop`) owns every file write. They
meet at a bytes-bounded queue: when the disk stalls the queue fills, the ingest thread
waits, the socket's high-water mark fills, and senders drop (and count) instead of the
collector growing. Worst-case memory: queue bytes + RCVHWM frames x max frame size.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections import Counter
from typing import Optional

from collector.index import RunIndex
from collector.load import load_stored
from collector.store import (REJECTED_CAP_BYTES, RunFiles, RunUnusable, atomic_write_json, rejected_line,
                             repair_tail)
from collector.wire import MAX_FRAME_BYTES, STREAM_FILES, WireError, decode, encode, encode_lines, valid_run_id

import msgspec

HANDOFF_S = 0.05  # pending lines reach the OS within ~50 ms (DESIGN: at least every 100 ms)
HANDOFF_BYTES = 1 << 20
FSYNC_S = 1.0
RCVHWM = 64  # frames waiting in the socket
UNUSABLE_RETRY_S = 5.0  # a run whose folder could not be used is tried again after this


class BytesQueue:
    """FIFO bounded by the bytes it holds; put waits while full (never while empty)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()

    def put(self, item, nbytes: int, stop: threading.Event) -> None:
        with self.cond:
            while self.items and self.bytes + nbytes > self.max_bytes and not stop.is_set():
                self.cond.wait(0.1)
            self.items.append((item, nbytes))
            self.bytes += nbytes
            self.cond.notify_all()

    def get(self, timeout: float):
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            if not self.items:
                return None
            item, nbytes = self.items.popleft()
            self.bytes -= nbytes
            self.cond.notify_all()
            return item


class Pending:
    """Lines waiting for the writer for one (run, kind): records as they arrived (a
    single-record frame, or a batched record's own bytes), and records to encode together
    (one encode_lines call) when sealed: those of a frame that holds a newline."""

    __slots__ = ("buf", "recs", "counts")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.recs: list = []
        self.counts: Counter = Counter()

    def add_line(self, raw: bytes, rank: int) -> None:
        if self.recs:
            self.seal()  # keep arrival order
        self.buf += raw
        self.buf += b"\n"
        self.counts[rank] += 1

    def add_lines(self, raws: list, rank: int) -> None:
        """Records of one rank as they arrived (their bytes hold no newline), a line each."""
        if self.recs:
            self.seal()  # keep arrival order
        self.buf += b"\n".join(raws)
        self.buf += b"\n"
        self.counts[rank] += len(raws)

    def add_recs(self, recs: list, rank: int) -> None:
        """Records of one rank to encode at the next seal."""
        self.recs.extend(recs)
        self.counts[rank] += len(recs)

    def seal(self) -> None:
        if self.recs:
            self.buf += encode_lines(self.recs)
            self.recs = []


def reason_class(msg: str) -> str:
    return msg.split(":", 1)[0] if ":" in msg else msg.split(" of ")[0]


class Ingest:
    def __init__(self, root: str, index, *, max_frame: int = MAX_FRAME_BYTES,
                 queue_bytes: int = 64 << 20, on_run_changed=None) -> None:
        self.root, self.index, self.max_frame = root, index, max_frame
        os.makedirs(root, exist_ok=True)
        self.runs: dict[str, RunFiles] = {}
        self.queue = BytesQueue(queue_bytes)
        self.pending: dict[tuple[str, str], list] = {}
        self.pending_bytes = 0
        self.last_handoff = time.monotonic()
        self.frames = self.records = self.written = self.rejected = self.write_failed = 0
        self.rejected_by_reason: Counter = Counter()
        self.rejected_no_run = 0  # of `rejected`: frames naming no usable run (the root's _rejected.jsonl)
        self.fsync_ms_last = self.fsync_ms_max = 0.0
        self.degraded: Optional[str] = None
        self.started = time.time()
        self.stop = threading.Event()
        self.on_run_changed = on_run_changed or (lambda run: None)
        self._dirty: set[str] = set()
        self.unusable: dict[str, tuple[float, str]] = {}  # run -> (retry after, why)
        self.closing = threading.Event()  # set at shutdown: loaders of stored records stop
        self.loaders: list[threading.Thread] = []
        self._repair_root_rejected()

    def _repair_root_rejected(self) -> None:
        """A torn last line of the root's _rejected.jsonl (a killed collector) is replaced by
        one saying so, as for a run's files."""
        path = os.path.join(self.root, "_rejected.jsonl")
        try:
            fragment = repair_tail(path) if os.path.isfile(path) else None
            if fragment:
                with open(path, "ab") as f:
                    f.write(rejected_line("torn line repaired at startup", fragment, file="_rejected.jsonl"))
        except OSError:
            pass

    # -- ingest thread --------------------------------------------------------------------
    def open_run(self, run: str) -> RunFiles:
        """The run's files, opened (and recovered) at its first record. Raises RunUnusable
        when its folder cannot be used (said once on stderr; tried again after
        UNUSABLE_RETRY_S): the caller quarantines the frame at the root and goes on."""
        rf = self.runs.get(run)
        if rf is None:
            known = self.unusable.get(run)
            if known is not None and time.monotonic() < known[0]:
                raise RunUnusable(known[1])
            try:
                rf = RunFiles(self.root, run)
            except RunUnusable as e:
                if known is None:
                    print(f"tensortap collector: {e}; its frames are quarantined in "
                          f"{os.path.join(self.root, '_rejected.jsonl')}", file=sys.stderr, flush=True)
                self.unusable[run] = (time.monotonic() + UNUSABLE_RETRY_S, str(e))
                raise
            self.unusable.pop(run, None)
            self.runs[run] = rf
            self.load_stored(rf)
            self.index.run(run).manifest = rf.manifest()
        return rf

    def load_stored(self, rf: RunFiles) -> None:
        """A run with records on disk (a restarted collector, its first new record): a thread
        of its own reads them into the run's live index, before what arrives from now on
        (collector.load.load_stored). The ingest thread goes on; it only sets the run's index
        lock first, so that its adds and the loader's merge take turns."""
        sizes = {fname: n for fname, n in rf.stored.items() if n}
        patch = dict(rf.patch)
        if not (sizes or patch):
            return
        new = RunIndex(rf.run)  # shown as loading from the start
        new.hold()
        new.loading = {"bytes": sum(sizes.values()), "read": 0}
        ri = self.index.run(rf.run, new)
        if ri is not new:
            return  # this index has the run already (an index shared by two Ingests: tests)
        t = threading.Thread(target=load_stored, args=(ri, rf.dir, sizes, patch),
                             kwargs={"stop": self.closing, "pause": self._loader_pause()},
                             name=f"tensortap-load-{rf.run}", daemon=True)
        t.start()
        self.loaders = [x for x in self.loaders if x.is_alive()] + [t]

    def _loader_pause(self):
        """What a loader of stored records does between two slices of its work: while frames
        are coming in, it sleeps as long as the slice took (ingest keeps at least half the
        interpreter: a CPU-bound thread would otherwise hold the GIL most of the time, and
        the ingest thread waits for it at each socket call); otherwise it only yields."""
        last = [self.frames, time.perf_counter()]

        def pause() -> None:
            now = time.perf_counter()
            time.sleep(min(now - last[1], 0.05) if self.frames != last[0] else 0)
            last[0], last[1] = self.frames, time.perf_counter()
        return pause

    def frame(self, frame: bytes) -> None:
        """Validate one frame and account for its records (the hot path)."""
        self.frames += 1
        try:
            recs, raw = decode(frame, self.max_frame)
        except WireError as e:
            self.reject(frame, str(e))
            return
        try:
            if type(raw) is bytes:  # a single record, written as it arrived
                self._record(recs[0], raw)
            elif not self._batch(recs, raw):  # record by record: see _record
                for run in {r.run for r in recs}:  # every run first: a frame is all-or-nothing
                    self.runs.get(run) or self.open_run(run)
                for i, rec in enumerate(recs):
                    self._record(rec, None if raw is None else raw[i])
        except RunUnusable as e:  # (raised before any of the frame's records is accounted)
            self.reject(frame, str(e), run_usable=False)
            return
        self.records += len(recs)
        self.pending_bytes += len(frame)
        if self.pending_bytes >= HANDOFF_BYTES:
            self.handoff()

    def _record(self, rec, line) -> None:
        """One record, any run or rank, duplicate or not, events and patch metrics included.
        line: its bytes as they arrived (no newline inside), or None: encode it."""
        rf = self.runs.get(rec.run) or self.open_run(rec.run)
        st = rf.ranks.get(rec.rank) or rf.rank(rec.rank)
        st.received += 1
        seq, exp = rec.seq + st.seq_offset, st.expected
        if seq != exp:
            if seq >= exp:
                st.gaps += seq - exp
            elif rec.seq == 0 and rec.kind == "events" and rec.name == "hello":
                # a new sender for this rank (a training run again with the same run id): a
                # sender's hello is its first record, never sent twice
                st.new_session(rec.data)
                seq = exp
            else:  # already seen (ZeroMQ keeps order per connection)
                st.duplicates += 1
                rf.touched = True  # no write follows: the next sync rewrites the manifest
                return
        st.expected = seq + 1
        if st.seq_offset:  # stored after the earlier sessions' records
            rec.seq, line = seq, None
        st.world = rec.world
        kind = rec.kind
        if kind == "events":
            self.event(st, rec)
        self.index.add(rec)
        if kind == "patch_metrics":  # one small JSON document, latest per name and rank
            key = rec.name if rec.rank == 0 else f"{rec.name}@rank{rec.rank}"
            self.queue.put(("patch", rec.run, key, rec.rank, encode(rec)), 512, self.stop)
            return
        p = self.pending.get((rec.run, kind))
        if p is None:
            p = self.pending[(rec.run, kind)] = Pending()
        if line is not None:
            p.add_line(line, rec.rank)
        else:
            p.add_recs((rec,), rec.rank)

    def _batch(self, recs: list, lines: Optional[list]) -> bool:
        """A batch as one sender sends it (one run and rank, the next sequence numbers in
        order, no events or patch metrics): accounted and indexed as a whole. False, having
        done nothing, for any other batch. lines: the records' own bytes, or None."""
        r0 = recs[0]
        run, rank, s0, n = r0.run, r0.rank, r0.seq, len(recs)
        rf = self.runs.get(run) or self.open_run(run)
        st = rf.ranks.get(rank) or rf.rank(rank)
        if (st.seq_offset or s0 < st.expected or recs[-1].seq != s0 + n - 1
                or not all(r.run == run and r.rank == rank for r in recs)
                or [r.seq for r in recs] != list(range(s0, s0 + n))):
            return False
        kinds = {r.kind for r in recs}
        if "events" in kinds or "patch_metrics" in kinds:
            return False
        st.received += n
        st.gaps += s0 - st.expected
        st.expected = s0 + n
        st.world = recs[-1].world
        self.index.run(run).add_many(recs, rank)
        pending = self.pending
        items = recs if lines is None else lines
        if len(kinds) == 1:
            groups = {r0.kind: items}
        else:
            groups = {k: [] for k in kinds}
            for r, item in zip(recs, items):
                groups[r.kind].append(item)
        for kind, group in groups.items():
            p = pending.get((run, kind))
            if p is None:
                p = pending[(run, kind)] = Pending()
            if lines is None:
                p.add_recs(group, rank)
            else:
                p.add_lines(group, rank)
        return True

    @staticmethod
    def event(st, rec) -> None:
        d = rec.data
        if rec.name == "hello":
            st.hello = d
            st.closed = False
        elif rec.name in ("bye", "drops"):
            if isinstance(d.get("dropped"), int):
                st.dropped_by_sender = st.dropped_before + d["dropped"]
            if isinstance(d.get("sent"), int):
                st.sent_by_sender = st.sent_before + d["sent"]
            st.closed = rec.name == "bye"

    def reject(self, frame: bytes, reason: str, run_usable: bool = True) -> None:
        """Count and quarantine one frame: in its run's rejected.jsonl when it names a run
        whose folder can be used, else in the root's _rejected.jsonl. Never raises."""
        self.rejected += 1
        self.rejected_by_reason[reason_class(reason)] += 1
        run = None
        if run_usable:
            try:  # quarantine in the run's folder when the frame names a usable run
                run = msgspec.json.decode(frame[: self.max_frame], type=_RunOnly).run
            except Exception:  # garbage: msgspec errors, bad UTF-8, nesting
                pass
            if run is not None and valid_run_id(run):
                try:
                    self.open_run(run)
                except Exception:  # RunUnusable, or a bug: the root it is
                    run = None
            else:
                run = None
        if run is None:
            self.rejected_no_run += 1
        self.queue.put(("reject", run, rejected_line(reason, frame)), 512, self.stop)

    def handoff(self) -> None:
        """Move pending lines to the writer (may wait while the queue is full)."""
        pending, self.pending = self.pending, {}
        for (run, kind), p in pending.items():
            p.seal()
            self.queue.put(("lines", run, kind, (p.buf, p.counts)), len(p.buf), self.stop)
        self.pending_bytes = 0
        self.last_handoff = time.monotonic()

    def handoff_if_due(self) -> None:
        if self.pending and time.monotonic() - self.last_handoff >= HANDOFF_S:
            self.handoff()

    # -- writer thread --------------------------------------------------------------------
    def write_loop(self, done: threading.Event) -> None:
        """Write chunks until `done` is set and the queue is empty; fsync each second."""
        last_sync = time.monotonic()
        while True:
            item = self.queue.get(0.1)
            if item is not None:
                try:
                    self.write_item(item)
                except Exception as e:  # a bug costs that chunk, never the writer thread
                    self.degraded = f"write failed: {e!r}"
            now = time.monotonic()
            if now - last_sync >= FSYNC_S:
                self.sync()
                last_sync = now
            if item is None and done.is_set() and not self.queue.items:
                break
        self.sync()

    def write_item(self, item) -> None:
        if item[0] == "reject":
            _, run, line = item
            if run is None:
                self._write_root_reject(line)
            else:
                try:
                    self.runs[run].add_rejected(line, self._write)
                except OSError:  # the run's folder went away: counted, not kept
                    pass
                self._dirty.add(run)
            return
        patch = item[0] == "patch"
        if patch:
            _, run, name, rank, line = item
            rf = self.runs[run]
            ok, counts = self._write_patch(rf, name, line), {rank: 1}
        else:
            _, run, kind, (data, counts) = item
            rf = self.runs[run]
            try:
                fd = rf.fd(STREAM_FILES[kind])
            except OSError as e:  # the run's folder went away
                ok, self.degraded = False, f"write failed: {e.strerror or e}"
            else:
                start = self._write(fd, data)
                ok = start is not None
                if ok:  # what the manifest's stream marks count (RunFiles.wrote)
                    rf.wrote(STREAM_FILES[kind], start, data, counts)
        n = sum(counts.values())
        for rank, c in counts.items():
            st = rf.rank(rank)
            if ok:
                st.written += c
                if patch:
                    st.patch_written += c
            else:
                st.write_failed += c
        if ok:
            self.written += n
        else:
            self.write_failed += n
        self._dirty.add(run)
        self.on_run_changed(run)

    def _write_patch(self, rf: RunFiles, name: str, line: bytes) -> bool:
        rf.patch[name] = msgspec.json.decode(line)
        try:
            atomic_write_json(os.path.join(rf.dir, "patch_metrics.json"), rf.patch)
            return True
        except OSError as e:
            self.degraded = f"write failed: {e.strerror}"
            return False

    def _write(self, fd: int, data) -> Optional[int]:
        """One os.write of whole lines at the file's end: the offset it was written at, or None
        (a short or failed write is cut back: no torn line)."""
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            n = write_fn(fd, data)
            if n == len(data):
                self.degraded = None
                return start
            err = "short write"
        except OSError as e:
            err = e.strerror or str(e)
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        self.degraded = f"write failed: {err}"
        return None

    def _write_root_reject(self, line: bytes) -> None:
        path = os.path.join(self.root, "_rejected.jsonl")
        try:
            if os.path.exists(path) and os.path.getsize(path) + len(line) > REJECTED_CAP_BYTES:
                return
            with open(path, "ab") as f:
                f.write(line)
        except OSError:
            pass

    def sync(self) -> None:
        t0 = time.perf_counter()
        dirty, self._dirty = self._dirty, set()
        for rf in list(self.runs.values()):
            if rf.touched:  # a change of the ingest thread no write followed (duplicates)
                rf.touched = False
                dirty.add(rf.run)
        for run in dirty:
            rf = self.runs[run]
            synced = rf.sync_files()  # the bytes the manifest's stream marks cover are on disk first
            try:
                man = rf.manifest()
                self.index.run(run).manifest = man
                atomic_write_json(os.path.join(rf.dir, "manifest.json"), rf.with_marks(man) if synced else man)
            except OSError as e:
                self.degraded = f"manifest write failed: {e.strerror or e}"
        ms = (time.perf_counter() - t0) * 1000
        self.fsync_ms_last, self.fsync_ms_max = ms, max(self.fsync_ms_max, ms)

    def close_files(self) -> None:
        for rf in self.runs.values():
            rf.close()

    # -- counters ---------------------------------------------------------------------------
    def health(self) -> dict:
        gaps = dups = dropped = 0
        for rf in list(self.runs.values()):
            for st in list(rf.ranks.values()):
                gaps += st.gaps
                dups += st.duplicates
                dropped += st.dropped_by_sender
        return {"status": "degraded" if self.degraded else "ok", "degraded": self.degraded,
                "uptime_s": round(time.time() - self.started, 3), "frames": self.frames,
                "received": self.records, "written": self.written, "rejected": self.rejected,
                "rejected_by_reason": dict(self.rejected_by_reason), "gaps": gaps,
                "duplicates": dups, "dropped_by_sender": dropped,
                "write_failed": self.write_failed, "queue_bytes": self.queue.bytes,
                "queue_max_bytes": self.queue.max_bytes, "fsync_ms_last": round(self.fsync_ms_last, 3),
                "fsync_ms_max": round(self.fsync_ms_max, 3), "runs": len(self.runs),
                "runs_loading": sum(1 for t in list(self.loaders) if t.is_alive())}


class _RunOnly(msgspec.Struct):
    run: str


def write_fn(fd: int, data) -> int:
    """The one place bytes hit a file; fault-injection tests replace it (see faults.py)."""
    return os.write(fd, data)
