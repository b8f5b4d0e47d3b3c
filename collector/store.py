"""JSONL store: per-run files, crash repair, the manifest, and the writer thread.

Layout (DESIGN.md): <root>/<run>/{loader_stats,activations,gradients,metrics,events}.jsonl,
patch_metrics.json, manifest.json, rejected.jsonl. Frames whose run id is unusable are
quarantined in <root>/_rejected.jsonl (no run id can start with "_", so it never clashes).

Durability: the ingest thread hands whole-line chunks to the writer through a bytes-bounded
queue; each chunk is one os.write. A short write (disk full) is rolled back with ftruncate,
so no partial record is ever left; the chunk's records are counted as `write_failed` and
the store reports itself degraded until a write succeeds again. Files are written to the OS
at once (the ingest thread hands off every 50 ms), fsynced every second and on close.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from collections import Counter
from typing import Optional

import msgspec

from collector.wire import STREAM_FILES, rank_key

# per rejected.jsonl; beyond it, frames are only counted (TENSORTAP_REJECTED_CAP, bytes)
REJECTED_CAP_BYTES = int(os.environ.get("TENSORTAP_REJECTED_CAP", 16 << 20))
HEAD_CHARS = 200  # how much of a rejected frame is kept, as text


class RankState:
    """Accounting for one (run, rank): what arrived, what is on disk, what was lost."""

    __slots__ = ("expected", "received", "written", "gaps", "duplicates", "write_failed",
                 "dropped_by_sender", "sent_by_sender", "world", "hello", "closed",
                 "patch_written", "sessions", "seq_offset", "sent_before", "dropped_before")

    def __init__(self) -> None:
        self.expected = self.received = self.written = self.gaps = self.duplicates = 0
        self.write_failed = self.dropped_by_sender = self.sent_by_sender = 0
        # of `written`: patch metrics records (patch_metrics.json keeps only the latest per
        # name, so a restart cannot count them from disk)
        self.patch_written = 0
        self.world = 1
        self.hello: Optional[dict] = None
        self.closed = False
        # a rank's sender sessions (a training run again with the same run id): each new one
        # numbers its records from 0; stored, they follow the earlier ones (seq + seq_offset),
        # and its sent/dropped reports add to those of the sessions before it
        self.sessions = 1
        self.seq_offset = self.sent_before = self.dropped_before = 0

    def as_dict(self) -> dict:
        return {"received": self.received, "written": self.written, "gaps": self.gaps,
                "duplicates": self.duplicates, "write_failed": self.write_failed,
                "dropped_by_sender": self.dropped_by_sender, "sent_by_sender": self.sent_by_sender,
                "next_seq": self.expected, "world": self.world, "closed": self.closed,
                "hello": self.hello, "patch_written": self.patch_written, "sessions": self.sessions,
                "seq_offset": self.seq_offset, "sent_before": self.sent_before,
                "dropped_before": self.dropped_before}

    def new_session(self, hello: dict) -> None:
        """A new sender process for this rank (its hello, seq 0, came after records of an
        earlier one): its records go after those already stored."""
        self.sessions += 1
        self.seq_offset = self.expected
        self.sent_before, self.dropped_before = self.sent_by_sender, self.dropped_by_sender
        self.hello, self.closed = hello, False


class _SeqOnly(msgspec.Struct):
    rank: int
    seq: int


_decode_seq = msgspec.json.Decoder(_SeqOnly).decode

MARKS_VERSION = 1
MARK_TAIL = 256  # a mark's fingerprint: the crc32 of the last bytes it covers


class Mark:
    """What one stream file holds up to `size` bytes (whole lines): stream records per rank.
    Kept by the writer thread (each write it makes adds to it), written in each manifest as
    `stream_marks`; a restart reads only the bytes after it (RunFiles._recover)."""

    __slots__ = ("size", "tail", "counts")

    def __init__(self, size: int, tail: bytes, counts: dict) -> None:
        self.size, self.tail, self.counts = size, tail, counts

    def wrote(self, start: int, data, counts: dict) -> bool:
        """`data` (whole lines; `counts`: records per rank) was written at `start`. False when
        the file was not where the mark said (someone else wrote to it): the mark is lost."""
        if start != self.size:
            return False
        n = len(data)
        self.size += n
        self.tail = bytes(data[-MARK_TAIL:]) if n >= MARK_TAIL else (self.tail + bytes(data))[-MARK_TAIL:]
        c = self.counts
        for rank, k in counts.items():
            c[rank] = c.get(rank, 0) + k
        return True

    def as_dict(self) -> dict:
        return {"bytes": self.size, "tail_crc32": zlib.crc32(self.tail),
                "ranks": {str(r): n for r, n in sorted(self.counts.items()) if n}}


def atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_writable(folder: str) -> None:
    """Make the artifact root `folder` if missing and write a file in it once: OSError when
    this process cannot (the collector's --out and the client's TENSORTAP_OUT say so early)."""
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".tensortap-write-test-{os.getpid()}")
    with open(probe, "w"):
        pass
    os.unlink(probe)


def repair_tail(path: str) -> Optional[bytes]:
    """Cut a torn last line (no trailing newline) off a JSONL file; return the fragment."""
    size = os.path.getsize(path)
    if size == 0:
        return None
    with open(path, "r+b") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        pos = size
        while pos > 0:  # scan back for the previous newline, 64 KiB at a time
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                cut = start + nl + 1
                break
            pos = start
        else:
            cut = 0
        f.seek(cut)
        fragment = f.read()
        f.truncate(cut)
        return fragment


class RunUnusable(Exception):
    """A run's folder cannot be used (a file in its place, no permission, unreadable files):
    its frames are quarantined at the root and the collector goes on with other runs."""


def _int(x, default: int = 0) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else default


def _note(msg: str) -> None:
    print(f"tensortap collector: {msg}", file=sys.stderr, flush=True)


class RunFiles:
    """Open files of one run, and its accounting per rank."""

    def __init__(self, root: str, run: str) -> None:
        self.run, self.dir = run, os.path.join(root, run)
        self.fds: dict[str, int] = {}
        self.ranks: dict[int, RankState] = {}
        self.patch: dict[str, dict] = {}
        self.rejected = 0
        self.created = time.time()
        # stream file -> its bytes before this collector wrote to it (what a restart found;
        # read back into the live index by collector.load.load_stored)
        self.stored: dict[str, int] = {}
        # stream file -> what its bytes hold so far (None: not known, someone else wrote to it);
        # kept by the writer thread, written in the manifest as `stream_marks`
        self.marks: dict[str, Optional[Mark]] = {}
        self.unsynced: list[str] = []  # stream files read at start, to fsync before a manifest covers them
        # set by the ingest thread for a change no write follows (a duplicate): the writer's
        # next sync rewrites the manifest
        self.touched = False
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._recover()
        except Exception as e:  # a file named like the run, no permission, ...
            self.close()
            raise RunUnusable(f"run folder unusable: {self.dir!r}: "
                              f"{e.strerror if isinstance(e, OSError) and e.strerror else repr(e)}") from None

    def _recover(self) -> None:
        """After a crash or restart: repair torn tails, rebuild per-rank accounting.

        The manifest (written every second and at stop) holds what the files cannot say:
        duplicates, failed writes, the senders' reports, and how many patch metrics records
        were written (patch_metrics.json keeps the latest of each name). The stream files say
        what is really stored, including what was written after the last manifest. So:
        next seq = max(manifest's, last stored + 1); written = stored stream records + patch
        records written; gaps = next seq - written - failed writes: a record lost with a
        killed collector is a gap, a failed write stays a failed write (counted once).

        Only what the manifest does not account for is read: its `stream_marks` say, for each
        stream file, how many bytes the writer had written (and fsynced) when it was written
        and how many records of each rank those bytes hold. A file that still holds them
        (at least that size, a line ending there, the same last bytes) is read from there on;
        any other file is read whole. The records a mark counts are all below their rank's
        `next_seq` in the same manifest (each was accounted on the ingest thread, which
        raised next_seq past it, before the writer wrote it), so reading them would change
        neither the next seq nor which of them are below the manifest's: the counts are those
        of a whole read."""
        old = self._old_manifest()
        rej = os.path.join(self.dir, "rejected.jsonl")
        if os.path.exists(rej):
            fragment = repair_tail(rej)
            if fragment:  # quarantined already; its torn line is replaced by one saying so
                with open(rej, "ab") as f:
                    f.write(rejected_line("torn line repaired at startup", fragment, file="rejected.jsonl"))
        self.rejected_bytes = os.path.getsize(rej) if os.path.exists(rej) else 0  # the cap holds across restarts
        ranks = old.get("ranks")
        ranks = {k: d for r, d in ranks.items() if (k := rank_key(r)) is not None
                 and isinstance(d, dict)} if isinstance(ranks, dict) else {}
        recorded = self._recorded_marks(old, ranks)
        seen: dict[int, list[int]] = {}  # rank -> stored seqs read (after the marks)
        marked: Counter = Counter()  # rank -> stream records the marks count (not read)
        patch_seqs: dict[int, list[int]] = {}
        for kind, fname in STREAM_FILES.items():
            path = os.path.join(self.dir, fname)
            if kind == "patch_metrics":
                if os.path.exists(path):
                    self._recover_patch(path, patch_seqs)
                continue
            if not os.path.exists(path):
                self.marks[fname] = Mark(0, b"", {})
                continue
            fragment = repair_tail(path)
            if fragment:  # kept in rejected.jsonl, not counted a frame rejected (its record is a gap)
                self.add_rejected(rejected_line("torn line repaired at startup", fragment, file=fname), count=False)
            size = self.stored[fname] = os.path.getsize(path)
            with open(path, "rb") as f:
                start, counts = self._mark_holds(f, fname, size, recorded.get(fname))
                marked.update(counts)
                f.seek(start)
                here: dict[int, list[int]] = {}
                for line in f:
                    try:
                        r = _decode_seq(line)
                    except msgspec.DecodeError:
                        continue
                    here.setdefault(r.rank, []).append(r.seq)
                f.seek(max(size - MARK_TAIL, 0))
                tail = f.read(size - max(size - MARK_TAIL, 0))
            for rank, seqs in here.items():
                seen.setdefault(rank, []).extend(seqs)
                counts[rank] = counts.get(rank, 0) + len(seqs)
            self.marks[fname] = Mark(size, tail, counts)
            if size > start:  # read here, maybe never fsynced: the next manifest's mark covers it
                self.unsynced.append(fname)
        for rank in sorted(set(seen) | set(marked) | set(patch_seqs) | set(ranks)):
            st, d = self.rank(rank), ranks.get(rank, {})
            stream, patch = seen.get(rank, []), patch_seqs.get(rank, [])
            n_marked = marked.get(rank, 0)  # all below next_m (see above)
            next_m = _int(d.get("next_seq"))
            if "patch_written" in d:  # patch records written, stored now or overwritten since
                patch_written = _int(d.get("patch_written")) + sum(1 for s in patch if s >= next_m)
            else:  # a manifest of an earlier version: what it counts beyond the stream files
                below = n_marked + sum(1 for s in stream if s < next_m)
                patch_written = max(_int(d.get("written")) - below, 0) + sum(1 for s in patch if s >= next_m)
            st.expected = max([next_m, *(s + 1 for s in stream), *(s + 1 for s in patch)])
            st.patch_written = patch_written
            st.written = n_marked + len(stream) + patch_written
            st.write_failed = _int(d.get("write_failed"))
            st.gaps = max(st.expected - st.written - st.write_failed, 0)
            st.duplicates = _int(d.get("duplicates"))
            st.dropped_by_sender = _int(d.get("dropped_by_sender"))
            st.sent_by_sender = _int(d.get("sent_by_sender"))
            st.world = _int(d.get("world"), 1) or 1
            st.hello = d.get("hello") if isinstance(d.get("hello"), dict) else None
            st.closed = d.get("closed") is True
            st.sessions = _int(d.get("sessions"), 1) or 1
            st.seq_offset = min(_int(d.get("seq_offset")), st.expected)
            st.sent_before, st.dropped_before = _int(d.get("sent_before")), _int(d.get("dropped_before"))
            st.received = max(_int(d.get("received")), st.written + st.write_failed + st.duplicates)

    @staticmethod
    def _recorded_marks(old: dict, ranks: dict) -> dict:
        """The manifest's stream marks that can be taken: file -> (bytes, tail crc32, records
        per rank). None of a manifest of an earlier version; none of a file whose mark names a
        rank the manifest's ranks do not describe as this version does (with `next_seq` and
        `patch_written`): its records' seqs could not be vouched for."""
        sm = old.get("stream_marks")
        if not isinstance(sm, dict) or sm.get("version") != MARKS_VERSION or not isinstance(sm.get("files"), dict):
            return {}
        names = {f for k, f in STREAM_FILES.items() if k != "patch_metrics"}
        out = {}
        for fname, m in sm["files"].items():
            if fname not in names or not isinstance(m, dict):
                continue
            size, crc, rk = m.get("bytes"), m.get("tail_crc32"), m.get("ranks")
            if _int(size, -1) < 0 or _int(crc, -1) < 0 or not isinstance(rk, dict):
                continue
            counts = {}
            for r, n in rk.items():
                d = ranks.get(rank_key(r))
                if d is None or _int(n, -1) < 0 or _int(d.get("next_seq"), -1) < 0 or "patch_written" not in d:
                    break
                counts[int(r)] = n
            else:
                out[fname] = (size, crc, counts)
        return out

    def _mark_holds(self, f, fname: str, size: int, mark) -> tuple[int, dict]:
        """Where to start reading a stream file, and the records per rank before that: the
        manifest's mark where the file still holds what it describes, else (0, {})."""
        if mark is None:
            return 0, {}
        msize, crc, counts = mark
        if msize == 0:
            return (0, dict(counts)) if not any(counts.values()) else (0, {})
        if msize <= size:
            lo = max(msize - MARK_TAIL, 0)
            f.seek(lo)
            tail = f.read(msize - lo)
            if tail.endswith(b"\n") and zlib.crc32(tail) == crc:
                return msize, dict(counts)
            why = "does not end as its manifest says"
        else:
            why = f"is shorter ({size} bytes) than its manifest says ({msize})"
        _note(f"{os.path.join(self.dir, fname)} {why}; reading it whole")
        return 0, {}

    def _old_manifest(self) -> dict:
        """manifest.json as a dict; anything else (torn, not an object) is treated as missing,
        and said once: the accounting is then rebuilt from the run's files alone."""
        mpath = os.path.join(self.dir, "manifest.json")
        if not os.path.exists(mpath):
            return {}
        try:
            with open(mpath, "rb") as f:
                old = msgspec.json.decode(f.read())
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            old, why = None, f"not JSON ({e})"
        else:
            why = f"not a JSON object but {type(old).__name__}"
        if not isinstance(old, dict):
            _note(f"{mpath} is not a manifest ({why}); rebuilding its counts from the run's files")
            return {}
        created = old.get("created")
        if isinstance(created, (int, float)) and not isinstance(created, bool):
            self.created = float(created)
        self.rejected = _int(old.get("rejected"))
        return old

    def _recover_patch(self, path: str, seen: dict) -> None:
        try:
            with open(path, "rb") as f:
                patch = msgspec.json.decode(f.read())
        except msgspec.DecodeError:
            patch = None
        if not isinstance(patch, dict) or not all(isinstance(v, dict) for v in patch.values()):
            _note(f"{path} is not a patch metrics document; rewritten with the next patch metrics record")
            patch = {}
        self.patch = patch
        for rec in patch.values():
            rank, seq = rec.get("rank", 0), rec.get("seq", 0)
            if isinstance(rank, int) and isinstance(seq, int) and rank >= 0 and seq >= 0:
                seen.setdefault(rank, []).append(seq)

    def rank(self, rank: int) -> RankState:
        st = self.ranks.get(rank)
        if st is None:
            st = self.ranks[rank] = RankState()
        return st

    def fd(self, fname: str) -> int:
        fd = self.fds.get(fname)
        if fd is None:
            fd = self.fds[fname] = os.open(os.path.join(self.dir, fname),
                                           os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return fd

    def add_rejected(self, line: bytes, write=os.write, count: bool = True) -> None:
        """Count one quarantined frame (count); append its line while rejected.jsonl is under the cap."""
        self.rejected += count
        if self.rejected_bytes + len(line) <= REJECTED_CAP_BYTES:
            write(self.fd("rejected.jsonl"), line)
            self.rejected_bytes += len(line)

    def unclosed(self) -> list[int]:
        """Ranks that said hello and not yet bye (read while the ingest thread may add ranks)."""
        return sorted(r for r, st in list(self.ranks.items()) if st.hello is not None and not st.closed)

    def manifest(self) -> dict:
        ranks = {str(r): st.as_dict() for r, st in sorted(self.ranks.items())}
        totals = Counter()
        for st in self.ranks.values():
            totals.update({k: v for k, v in st.as_dict().items()
                           if k in ("received", "written", "gaps", "duplicates", "write_failed",
                                    "dropped_by_sender", "sent_by_sender")})
        return {"run": self.run, "schema": 1, "created": self.created, "updated": time.time(),
                "world": max((st.world for st in self.ranks.values()), default=1),
                "ranks": ranks, "totals": dict(totals), "rejected": self.rejected,
                "files": sorted(f for f in os.listdir(self.dir) if not f.endswith(".tmp"))}

    def wrote(self, fname: str, start: int, data, counts: dict) -> None:
        """The writer wrote `data` (whole lines, `counts` records per rank) to a stream file at
        offset `start`."""
        m = self.marks.get(fname)
        if m is not None and not m.wrote(start, data, counts):
            self.marks[fname] = None  # not where we left it: the next restart reads it whole

    def sync_files(self) -> bool:
        """fsync the run's open files (and those read at start whose bytes a mark covers);
        True when every fsync succeeded: the marks may then go into the manifest."""
        unsynced, self.unsynced = self.unsynced, []
        for fname in unsynced:
            try:
                self.fd(fname)  # opened (for append, as the writer does): fsynced below
            except OSError:
                self.unsynced.append(fname)
        ok = not self.unsynced
        for fd in list(self.fds.values()):
            try:
                os.fsync(fd)
            except OSError:
                ok = False
        return ok

    def with_marks(self, man: dict) -> dict:
        """The manifest as written to disk: with the stream marks (call on the writer thread,
        after sync_files, nothing written in between)."""
        files = {f: m.as_dict() for f, m in sorted(self.marks.items()) if m is not None and m.size}
        return {**man, "stream_marks": {"version": MARKS_VERSION, "files": files}}

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.close(fd)
        self.fds.clear()


def rejected_line(reason: str, frame: bytes, **extra) -> bytes:
    head = frame[:HEAD_CHARS].decode("utf-8", "backslashreplace")
    return json.dumps({"t": time.time(), "reason": reason[:300], "bytes": len(frame),
                       "head": head, **extra}).encode() + b"\n"
