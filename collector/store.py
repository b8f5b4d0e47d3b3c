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
import time
from collections import Counter
from typing import Optional

import msgspec

from collector.wire import STREAM_FILES

# per rejected.jsonl; beyond it, frames are only counted (TENSORTAP_REJECTED_CAP, bytes)
REJECTED_CAP_BYTES = int(os.environ.get("TENSORTAP_REJECTED_CAP", 16 << 20))
HEAD_CHARS = 200  # how much of a rejected frame is kept, as text


class RankState:
    """Accounting for one (run, rank): what arrived, what is on disk, what was lost."""

    __slots__ = ("expected", "received", "written", "gaps", "duplicates", "write_failed",
                 "dropped_by_sender", "sent_by_sender", "world", "hello", "closed")

    def __init__(self) -> None:
        self.expected = self.received = self.written = self.gaps = self.duplicates = 0
        self.write_failed = self.dropped_by_sender = self.sent_by_sender = 0
        self.world = 1
        self.hello: Optional[dict] = None
        self.closed = False

    def as_dict(self) -> dict:
        return {"received": self.received, "written": self.written, "gaps": self.gaps,
                "duplicates": self.duplicates, "write_failed": self.write_failed,
                "dropped_by_sender": self.dropped_by_sender, "sent_by_sender": self.sent_by_sender,
                "next_seq": self.expected, "world": self.world, "closed": self.closed,
                "hello": self.hello}


class _SeqOnly(msgspec.Struct):
    rank: int
    seq: int


_decode_seq = msgspec.json.Decoder(_SeqOnly).decode


def atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class RunFiles:
    """Open files of one run, and its accounting per rank."""

    def __init__(self, root: str, run: str) -> None:
        self.run, self.dir = run, os.path.join(root, run)
        os.makedirs(self.dir, exist_ok=True)
        self.fds: dict[str, int] = {}
        self.ranks: dict[int, RankState] = {}
        self.patch: dict[str, dict] = {}
        self.rejected = 0
        self.created = time.time()
        rej = os.path.join(self.dir, "rejected.jsonl")
        self.rejected_bytes = os.path.getsize(rej) if os.path.exists(rej) else 0  # the cap holds across restarts
        self._recover()

    def _recover(self) -> None:
        """After a crash or restart: repair torn tails, rebuild per-rank seq state from disk."""
        old = {}
        mpath = os.path.join(self.dir, "manifest.json")
        if os.path.exists(mpath):
            try:
                with open(mpath, "rb") as f:
                    old = msgspec.json.decode(f.read())
                self.created = old.get("created", self.created)
                self.rejected = old.get("rejected", 0)
            except (msgspec.DecodeError, OSError):
                old = {}
        seen: dict[int, list[int]] = {}
        for kind, fname in STREAM_FILES.items():
            path = os.path.join(self.dir, fname)
            if not os.path.exists(path):
                continue
            if kind == "patch_metrics":
                self._recover_patch(path, seen)
                continue
            fragment = repair_tail(path)
            if fragment:
                self.reject_line("torn line repaired at startup", fragment, file=fname)
            with open(path, "rb") as f:
                for line in f:
                    try:
                        r = _decode_seq(line)
                    except msgspec.DecodeError:
                        continue
                    seen.setdefault(r.rank, []).append(r.seq)
        for rank, seqs in seen.items():
            st = self.rank(rank)
            st.written = len(seqs)
            st.expected = max(seqs) + 1
            st.gaps = st.expected - len(set(seqs))
            st.received = st.written
        for rank, d in (old.get("ranks") or {}).items():
            st = self.rank(int(rank))
            st.duplicates = d.get("duplicates", 0)
            st.dropped_by_sender = d.get("dropped_by_sender", 0)
            st.sent_by_sender = d.get("sent_by_sender", 0)
            st.write_failed = d.get("write_failed", 0)
            st.world = d.get("world", 1)
            st.hello, st.closed = d.get("hello"), d.get("closed", False)
            st.received = max(st.received, d.get("received", 0))

    def _recover_patch(self, path: str, seen: dict) -> None:
        try:
            with open(path, "rb") as f:
                self.patch = msgspec.json.decode(f.read())
        except (msgspec.DecodeError, OSError):
            self.patch = {}
        for rec in self.patch.values():
            seen.setdefault(rec.get("rank", 0), []).append(rec.get("seq", 0))

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

    def reject_line(self, reason: str, frame: bytes, **extra) -> None:
        self.add_rejected(rejected_line(reason, frame, **extra))

    def add_rejected(self, line: bytes, write=os.write) -> None:
        """Count one quarantined frame; append its line while rejected.jsonl is under the cap."""
        self.rejected += 1
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
