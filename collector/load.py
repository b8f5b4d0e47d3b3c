"""Read stored runs back: the index behind `tensortap serve ROOT`, the records replay sends,
and the stored records a restarted collector puts back into a run's live index (`load_stored`).

ROOT may also be one run's folder (that run is served). A run folder is any folder holding a
manifest.json or one of the stream files (collector.wire.STREAM_FILES). A torn last line (a
killed collector) and lines that are not valid records are skipped and counted, never fatal.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import msgspec

from collector.index import Index, RunIndex
from collector.wire import STREAM_FILES, Record, rank_key, valid_run_id

_decode_record = msgspec.json.Decoder(Record).decode
_decode_any = msgspec.json.Decoder().decode
_decode_records = msgspec.json.Decoder(list[Record]).decode

LOAD_BLOCK = 256 << 10  # bytes read (and decoded in one call) at a time by load_stored
LOAD_SLICE = 500  # records load_stored indexes between two pauses


class LoadStats:
    """What reading a folder skipped: torn last lines, bad lines, unreadable documents."""

    def __init__(self) -> None:
        self.records = self.torn = self.bad = self.bad_docs = 0

    def as_dict(self) -> dict:
        return {"records": self.records, "torn_lines": self.torn, "bad_lines": self.bad,
                "bad_documents": self.bad_docs}


def jsonl_records(path: str, stats: LoadStats) -> Iterator[Record]:
    """Records of one JSONL file, in file order; a last line without its newline is torn."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1].strip():
        stats.torn += 1  # no newline at the end: the writer was killed mid-line
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            rec = _decode_record(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            stats.bad += 1
            continue
        stats.records += 1
        yield rec


def jsonl_blocks(path: str, size: int, stats: LoadStats,
                 block: int = LOAD_BLOCK) -> Iterator[tuple[list[Record], int]]:
    """The records of the first `size` bytes of a JSONL file, a list per ~`block` bytes, in
    file order, each with the bytes it was read from. Each block's whole lines are decoded in
    one call (as a JSON array); a block holding a line that is not a record is decoded line
    by line, skipping (and counting) the bad ones. Bytes after the last newline within
    `size` count as a torn line."""
    with open(path, "rb") as f:
        left, carry = size, b""
        while left > 0:
            data = f.read(min(block, left))
            if not data:
                break  # shorter than it was: the bytes that are there
            left -= len(data)
            nbytes = len(data)
            data = carry + data
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            lines = [ln for ln in data[:cut].split(b"\n") if ln.strip()]
            if not lines:
                yield [], nbytes
                continue
            try:
                recs = _decode_records(b"[" + b",".join(lines) + b"]")
                if len(recs) != len(lines):  # a line of two records ("{..},{..}") is not one
                    raise msgspec.DecodeError
            except (msgspec.DecodeError, msgspec.ValidationError):
                recs = []
                for line in lines:
                    try:
                        recs.append(_decode_record(line))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        stats.bad += 1
            stats.records += len(recs)
            yield recs, nbytes
        if carry.strip():
            stats.torn += 1


def load_stored(ri: RunIndex, run_dir: str, sizes: dict[str, int], patch: dict,
                pause: Callable[[], None] = lambda: time.sleep(0),
                stop: Optional[threading.Event] = None) -> LoadStats:
    """Put a run's stored records into its live index `ri`, before the records it took in
    since (a restarted collector: the run's first new record came). Runs on a thread of its
    own while ingest goes on: `ri.hold()` must have been called before the run's first live record.

    sizes: {stream file: bytes it held before this collector wrote to it}: only those are
    read, so a record is either stored-before (read here) or taken in since (in `ri`), never
    both; a record sent again is a duplicate by its sequence number and is never indexed.
    patch: patch_metrics.json as it was then ({name: record}). The records go into a private
    RunIndex (memory bounded as any index), which is then merged, stored points first
    (RunIndex.merge_stored). `pause()` runs after each block and between merge chunks.
    A failure is said in one line on stderr and recorded in `ri.load_error`; the live
    records stay as they are. Never raises."""
    stats = LoadStats()
    ri.loading = {"bytes": sum(sizes.values()), "read": 0}
    stored = RunIndex(ri.run)
    try:
        if not ri.findings:  # the last diagnosis, until the live one comes
            ri.findings = stored_docs(run_dir)[1] or ri.findings
        for fname, size in sizes.items():
            for recs, nbytes in jsonl_blocks(os.path.join(run_dir, fname), size, stats):
                for i in range(0, len(recs), LOAD_SLICE):
                    stored.add_stored(recs[i:i + LOAD_SLICE])
                    pause()
                    if stop is not None and stop.is_set():
                        return stats
                ri.loading["read"] += nbytes
        recs = []
        for item in patch.values():
            try:
                recs.append(msgspec.convert(item, Record))
            except msgspec.ValidationError:
                stats.bad += 1
        recs.sort(key=lambda r: (r.t, r.rank, r.seq))
        stored.add_stored(recs)
        stats.records += len(recs)
        ri.merge_stored(stored, pause=pause)
    except Exception as e:  # a vanished folder, a bug: the live records stay as they are
        ri.load_error = f"{type(e).__name__}: {e}"
        print(f"tensortap collector: could not load the stored records of run {ri.run}: "
              f"{ri.load_error}; its view shows the records taken in since the restart",
              file=sys.stderr, flush=True)
    finally:
        lock = ri.lock
        if lock is not None:  # (not merged: a failure, or stopped)
            with lock:
                ri.release()
        ri.loading = None
    return stats


def _read_json(path: str, stats: LoadStats):
    try:
        with open(path, "rb") as f:
            return _decode_any(f.read())
    except (OSError, msgspec.DecodeError):
        stats.bad_docs += 1
        return None


def patch_records(path: str, stats: LoadStats) -> list[Record]:
    """patch_metrics.json: {name: record} (latest per name), or a list of records."""
    doc = _read_json(path, stats)
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    out = []
    for item in items:
        try:
            out.append(msgspec.convert(item, Record))
            stats.records += 1
        except msgspec.ValidationError:
            stats.bad += 1
    return out


def run_records(run_dir: str, stats: Optional[LoadStats] = None) -> list[Record]:
    """Every record of a stored run, ordered by (t, rank, seq)."""
    stats = stats or LoadStats()
    recs: list[Record] = []
    for kind, fname in STREAM_FILES.items():
        path = os.path.join(run_dir, fname)
        if not os.path.isfile(path):
            continue
        if fname.endswith(".jsonl"):
            recs.extend(jsonl_records(path, stats))
        else:
            recs.extend(patch_records(path, stats))
    recs.sort(key=lambda r: (r.t, r.rank, r.seq))
    return recs


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("manifest.json", *STREAM_FILES.values()))


def load_run(run_dir: str, stats: Optional[LoadStats] = None) -> RunIndex:
    """One stored run as a RunIndex: its records, manifest.json and findings.json."""
    stats = stats or LoadStats()
    ri = RunIndex(os.path.basename(os.path.abspath(run_dir)))
    for rec in run_records(run_dir, stats):
        ri.add(rec)
    ri.manifest, findings = stored_docs(run_dir, stats)
    ri.findings = findings or []
    ri.arrived = 0.0  # read from disk just now, received long ago: not live
    return ri


def stored_docs(run_dir: str, stats: Optional[LoadStats] = None) -> tuple[dict, Optional[list]]:
    """A stored run's manifest.json ({} when missing or unreadable) and the findings of its
    findings.json (None when missing or unreadable), without reading its records."""
    stats = stats or LoadStats()
    mpath, fpath = os.path.join(run_dir, "manifest.json"), os.path.join(run_dir, "findings.json")
    m = _read_json(mpath, stats) if os.path.isfile(mpath) else None
    f = _read_json(fpath, stats) if os.path.isfile(fpath) else None
    f = f.get("findings") if isinstance(f, dict) else f
    return (m if isinstance(m, dict) else {}), ([x for x in f if isinstance(x, dict)] if isinstance(f, list) else None)


MAX_LOADED_RUNS = 8  # runs `serve` holds read at once; the least recently asked for goes
RESCAN_S = 5.0  # `serve` looks for new run folders at most this often (when runs are listed)


class StoredIndex(Index):
    """The runs under a folder (or the one run of a run's folder), for `tensortap serve ROOT`
    (no ingest). Listed at start from
    each run's manifest.json and findings.json (a run without a manifest is read whole);
    a run's records are read when it is first asked for (`get`), and at most
    MAX_LOADED_RUNS runs are held so: a folder of a thousand runs starts in about the time
    it takes to read their manifests, in bounded memory. health() reports mode "serve", the
    root, the runs, the records their manifests count, and what reading skipped so far. A run
    whose folder has gone (deleted while served) is no longer listed, nor served.

    hide(run): True for a run this index must neither list nor serve (collect's view: the
    runs it has live, see CollectIndex); such a run is not read, and `forget` drops it."""

    def __init__(self, root: str, hide: Optional[Callable[[str], bool]] = None) -> None:
        super().__init__()
        self.hide = hide or (lambda run: False)
        self.root, self.stats, self.loaded_at = root, LoadStats(), time.time()
        # ROOT is itself a run's folder: that run, found in the folder above
        self.only = os.path.basename(os.path.abspath(root)) if is_run_dir(root) else None
        self.base = os.path.dirname(os.path.abspath(root)) if self.only else root
        self._listed: dict[str, dict] = {}  # run -> its summary
        self._recent: list[str] = []  # the runs held read, least recently asked for first
        self._scanned = 0.0
        self._scan(first=True)
        self.health = lambda: {"mode": "serve", "root": os.path.abspath(root), "runs": len(self._listed),
                               "runs_read": len(self.runs), "loaded_at": self.loaded_at,
                               **self.stats.as_dict(), "records": sum(s["records"] for s in self.summaries())}

    def _scan(self, first: bool = False) -> None:
        """List the run folders not listed yet. After the first scan (at most every RESCAN_S,
        when the runs are listed) a run is listed once its collector has written a manifest:
        runs written meanwhile (a training beside `serve`) appear in the list."""
        self._scanned = time.monotonic()
        for name in [n for n in self._listed if not is_run_dir(self._path(n))]:
            self._drop(name)  # deleted meanwhile
        try:
            names = [self.only] if self.only else sorted(os.listdir(self.root))
        except OSError:
            return
        for name in names:
            path = self._path(name)
            if name in self._listed or not valid_run_id(name) or self.hide(name) or not is_run_dir(path):
                continue  # (the folder name is the run id)
            summary = self._summary(name, path, read_bare=first)
            if summary is not None:
                self._listed[name] = summary

    def _path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def forget(self, name: str) -> None:
        """No longer list nor hold `name` (it is hidden from now on: not listed again)."""
        if name in self._listed or name in self.runs:
            self._drop(name)

    def _drop(self, name: str) -> None:
        with self._lock:
            self._listed.pop(name, None)
            self.runs.pop(name, None)
            if name in self._recent:
                self._recent.remove(name)

    def _summary(self, name: str, path: str, read_bare: bool = True) -> Optional[dict]:
        m, findings = stored_docs(path)
        totals = m.get("totals")
        written = totals.get("written") if isinstance(totals, dict) else None
        if not isinstance(written, int) and not read_bare:
            return None  # a run being written, its first manifest to come: the next scan
        if not isinstance(written, int):  # no usable manifest: read the run now
            ri = self._read(name)
            return {"run": name, "live": False, "state": ri.state(), "records": ri.count,
                    "ranks": sorted(ri.ranks), "first_t": ri.first_t, "last_t": ri.last_t,
                    "findings": len(ri.findings)}
        ranks = m.get("ranks") if isinstance(m.get("ranks"), dict) else {}
        # a rank that said hello and never bye: the training stopped without closing
        unclosed = any(isinstance(st, dict) and st.get("hello") is not None and st.get("closed") is not True
                       for st in ranks.values())
        return {"run": name, "live": False, "state": "unclosed" if unclosed else "finished", "records": written,
                "ranks": sorted(k for r in ranks if (k := rank_key(r)) is not None),
                "first_t": _num(m.get("created")), "last_t": _num(m.get("updated")),
                "findings": len(findings or [])}

    def _read(self, name: str) -> RunIndex:
        with self._lock:
            ri = self.runs.get(name)
            if ri is None:
                ri = self.runs[name] = load_run(self._path(name), self.stats)
                self._recent.append(name)
                while len(self._recent) > MAX_LOADED_RUNS:
                    self.runs.pop(self._recent.pop(0), None)
            elif self._recent[-1] != name:
                self._recent.remove(name)
                self._recent.append(name)
        return ri

    def get(self, run: str) -> Optional[RunIndex]:
        if run not in self._listed:
            return None
        if self.hide(run):
            self._drop(run)
            return None
        if not os.path.isdir(self._path(run)):  # deleted while served
            self._drop(run)
            return None
        return self._read(run)

    def summaries(self) -> list[dict]:
        """As listed, whether read since or not (the records a manifest counts include the
        patch metrics that patch_metrics.json, holding the latest, no longer has)."""
        if time.monotonic() - self._scanned >= RESCAN_S:
            self._scan()
        return sorted(self._listed.values(), key=lambda s: s["first_t"])


class CollectIndex(Index):
    """`tensortap collect`'s view: the runs this collector takes in (live: `runs`, `run`,
    `add`, as Index; the ingest thread uses nothing else) and, for the other runs under its
    root (from before a restart, earlier trainings), their stored copies, as `serve` shows
    them: a StoredIndex, listed from the manifests, a run read when it is opened, at most
    MAX_LOADED_RUNS held. That StoredIndex is made at the first listing or opening of a run
    (an HTTP handler), not at start: a root of many runs costs the start (and ingest) nothing.

    A run is listed once, and once it has a live index (its first record since this
    collector started: collector.load.load_stored puts its stored records into it) that one
    is served and the stored copy is dropped and never listed again."""

    def __init__(self, root: str, health=None) -> None:
        super().__init__(health)
        self.root = root
        self._stored: Optional[StoredIndex] = None
        self._stored_lock = threading.Lock()

    @property
    def stored(self) -> StoredIndex:
        st = self._stored
        if st is None:
            with self._stored_lock:
                if self._stored is None:
                    runs = self.runs
                    self._stored = StoredIndex(self.root, hide=lambda run: run in runs)
                st = self._stored
        return st

    def get(self, run: str) -> Optional[RunIndex]:
        live = self.runs.get(run)
        if live is None:
            ri = self.stored.get(run)
            live = self.runs.get(run)  # (live meanwhile, while its files were read: that one)
            if live is None:
                return ri
        if self._stored is not None:
            self._stored.forget(run)
        return live

    def summaries(self) -> list[dict]:
        stored = self.stored.summaries()
        live = super().summaries()  # after the stored ones: a run live meanwhile is in here
        names = {s["run"] for s in live}
        out = list(live)
        for s in stored:
            if s["run"] in names:
                self.stored.forget(s["run"])
            else:
                out.append({**s, "loading": False, "stored": True})  # (the page reopens it once live)
        return sorted(out, key=lambda s: s["first_t"])


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) else 0.0


def load_root(root: str) -> StoredIndex:
    """Index over every run folder under `root` (for `tensortap serve ROOT`): StoredIndex."""
    return StoredIndex(root)
