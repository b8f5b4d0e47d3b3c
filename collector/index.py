"""In-memory index of runs, kept by the collector and read (only) by the dashboard.

Per run, per (kind, name, rank) series, columnar arrays of every numeric statistic (nested keys
flattened with dots: "abs.mean"). Memory is bounded: at most MAX_POINTS points per series
(older halves are thinned 2:1 when full), MAX_SERIES series per run, a ring of the last
RECENT records per run for live streaming (server-sent events), and full records kept only
for the small kinds (loader_stats, patch_metrics, events).

An activation taken in an evaluation (its data says {"split": "val"}) goes into a series of its
own, "name · val" (`series_name`), not into the training one.

Ranks are kept apart (DDP: each rank's loss is its own series, not one zigzag of both). A
series is shown under its `label`: its name for rank 0 and in a single-rank run, "name · rank
r" otherwise (`RunIndex.label`; a run is of several ranks from its first record that says a
world size above 1, so a rank 1 that comes first is labelled as such from the start).

Thread model: the ingest thread calls `add`; HTTP handlers read. Appends to Python lists and
arrays are atomic under the GIL, so readers see a consistent prefix.

A run that has records on disk when a (restarted) collector takes its first new record is
loaded by a thread of its own (collector.load.load_stored): the stored records go into a
private RunIndex (`add_stored`), which is then merged into the live one, stored points first
(`merge_stored`). While that runs (`hold` to `release`), `lock` is set and that run's adds
are locked ones: the ingest thread takes it to add records of that run, and the loader takes
it to merge a few series at a time; otherwise adds take no lock and check none. Readers
never lock: a merged series is a new Series object put in place of the old one, so a reader
holds either the old one or the new one, each consistent.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from array import array
from typing import Any, Iterable, Optional

from collector.wire import eval_split

MAX_POINTS = 10_000
MAX_SERIES = 4_096
RECENT = 20_000
SINGLES = 256  # single records sharing one block of the recent ring, at most
FULL_KINDS = ("loader_stats", "patch_metrics", "events")
MAX_FULL = 2_000


def flatten(data: dict, prefix: str = "", out: Optional[dict] = None) -> dict[str, float]:
    """Numeric leaves of a payload as {"a.b": float}; None becomes NaN, bools and text skipped."""
    out = {} if out is None else out
    for k, v in data.items():
        t = type(v)
        if t is float or t is int:
            out[prefix + k] = v
        elif v is None:
            out[prefix + k] = math.nan
        elif t is dict:
            flatten(v, prefix + k + ".", out)
    return out


def series_name(name: str, split: Optional[str]) -> str:
    """The name of the series a record goes into: its own, or for an evaluation's activation
    f"{name} · {split}", a series of its own (not drawn into the training one)."""
    return name if split is None else f"{name} · {split}"


class Series:
    """One (kind, name, rank) series, row-major: rows = [step, t, v_0 .. v_k-1, step, t, ...] with
    v_j the statistic keys[j]. A payload whose keys are already its flat numeric statistics
    (gradients, metrics) is appended with one array construction; others are flattened."""

    __slots__ = ("keys", "col", "width", "rows", "sig", "n", "stride")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.col: dict[str, int] = {}  # stat -> index in a row (2 + j)
        self.width = 2
        self.rows = array("d")
        self.sig: Optional[tuple] = None  # payload keys that take the fast path
        self.n = 0  # points appended so far (before thinning)
        self.stride = 1  # keep every stride-th point once thinned

    def append(self, step: float, t: float, data: dict) -> None:
        """A point kept whatever the stride (RunIndex._series_add counts every point in `n`
        and appends every stride-th)."""
        if self.sig is not None and tuple(data) == self.sig:
            vals = [step, t, *data.values()]
            if None in vals:
                vals = [math.nan if v is None else v for v in vals]
            try:
                self.rows.extend(array("d", vals))
            except TypeError:  # a value of another type this time: flatten it
                self._add_flat(step, t, data)
        else:
            self._add_flat(step, t, data)
        if len(self.rows) >= MAX_POINTS * self.width:
            self._thin()

    def _add_flat(self, step: float, t: float, data: dict) -> None:
        flat = flatten(data)
        if not self.keys and self.sig is None:
            self.sig = tuple(data) if list(data) == list(flat) else ()
        new = [k for k in flat if k not in self.col]
        if new:
            self._widen(new)
        row = [math.nan] * self.width
        row[0], row[1] = step, t
        for k, v in flat.items():
            row[self.col[k]] = v
        self.rows.extend(array("d", row))

    def _widen(self, new: list[str]) -> None:
        """New statistics: every earlier row gets NaN for them (rare: schema changes)."""
        old_w, rows = self.width, self.rows
        w = old_w + len(new)
        out = array("d")
        pad = array("d", [math.nan] * len(new))
        for i in range(0, len(rows), old_w):
            out.extend(rows[i:i + old_w])
            out.extend(pad)
        for k in new:
            self.col[k] = 2 + len(self.keys)
            self.keys.append(k)
        self.rows, self.width = out, w
        if self.sig and set(self.sig) != set(self.keys):
            self.sig = ()

    def _thin(self) -> None:
        """Every other row (the 1st, 3rd, ...), a column at a time (slices, no loop per row)."""
        w, rows = self.width, self.rows
        keep = (len(rows) // w + 1) // 2
        out = array("d", bytes(8 * keep * w))
        for j in range(w):
            out[j::w] = rows[j::2 * w]
        self.rows = out
        self.stride *= 2

    @staticmethod
    def merged(a: "Series", b: "Series") -> "Series":
        """A new series: the points of `a`, then those of `b` (same kind, name and rank: the
        stored part of a series and its live part). Columns are `a`'s and then those only `b`
        has; a statistic one of them lacks is NaN in its rows. Thinned like `append`."""
        m = Series()
        m.keys = list(a.keys) + [k for k in b.keys if k not in a.col]
        m.col = {k: 2 + i for i, k in enumerate(m.keys)}
        w = m.width = 2 + len(m.keys)
        ra, wa, na = a.rows, a.width, a.points()
        rb, wb, nb = b.rows, b.width, b.points()
        rows = array("d", [math.nan]) * ((na + nb) * w)
        if wa == w:
            rows[:na * w] = ra[:na * w]
        else:
            for j in range(wa):  # a's columns keep their places
                rows[j:na * w:w] = ra[j:na * wa:wa]
        places = [0, 1] + [m.col[k] for k in b.keys]
        off = na * w
        if places == list(range(w)):
            rows[off:] = rb[:nb * wb]
        else:
            for j, to in enumerate(places):
                rows[off + to::w] = rb[j:nb * wb:wb]
        m.rows = rows
        m.sig = a.sig if a.sig == b.sig else ()  # () : every payload flattened (always right)
        m.n, m.stride = a.n + b.n, max(a.stride, b.stride)
        while len(m.rows) >= MAX_POINTS * w:
            m._thin()
        return m

    def snapshot(self) -> tuple[array, int, dict[str, int], int]:
        """(rows, width, stat -> row index, points), consistent for a reader thread."""
        rows, w = self.rows, self.width
        col = dict(self.col)
        if w != self.width:  # widened meanwhile: take it again
            return self.snapshot()
        return rows, w, col, len(rows) // w

    def points(self) -> int:
        return len(self.rows) // self.width

    def stats(self) -> list[str]:
        return sorted(self.col)


class RunIndex:
    """What the dashboard may read about one run."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.series: dict[tuple[str, str, int], Series] = {}
        self.full: dict[str, collections.deque] = {k: collections.deque(maxlen=MAX_FULL) for k in FULL_KINDS}
        # the last >= RECENT records, as added, in blocks: (number of the first, records,
        # their steps). A frame's records are one block; single records share a block, up
        # to SINGLES. A step of None marks a record kept out of the series (MAX_SERIES).
        self.recent: collections.deque = collections.deque()
        self._recent_n = 0  # records in `recent`
        self._singles: Optional[tuple[list, list]] = None  # the block single records join
        self.count = 0  # records added; the cursor of `since`
        self.first_t = self.last_t = 0.0
        # when the last record arrived here (collector clock): liveness goes by it, not by the
        # records' own t (a replay re-sends a stored run's original timestamps)
        self.arrived = 0.0
        self.closed_ranks: set[int] = set()
        self.opened_ranks: set[int] = set()  # ranks whose hello came (a run's state: `state`)
        self.ranks: set[int] = set()
        self.multi = False  # a record said a world size above 1 (or two ranks came): labels name ranks
        self.manifest: dict[str, Any] = {}
        self._findings: list[dict] = []
        self.findings_rev = 0  # how many times the findings changed (the live stream tells the page)
        self.dropped_series = 0  # records kept out of the series (MAX_SERIES reached)
        # (kind, series name) -> (record name, split) of an evaluation's series ("x · val")
        self.splits: dict[tuple[str, str], tuple[str, str]] = {}
        self.loaded = 0  # records merged in from the run's files (not counted in `count`)
        # while the stored records are being read and merged (collector.load.load_stored):
        # {"bytes": to read, "read": read so far}; None otherwise
        self.loading: Optional[dict] = None
        self.load_error: Optional[str] = None
        self.lock: Optional[threading.Lock] = None  # set while a load may merge (see the module doc)

    @property
    def findings(self) -> list[dict]:
        """The run's findings (diagnosis), most severe first."""
        return self._findings

    @findings.setter
    def findings(self, found: list[dict]) -> None:
        if found != self._findings:  # (the diagnosis sets them each round; unchanged: no news)
            self._findings = found
            self.findings_rev += 1

    def add(self, rec) -> None:
        """rec: a collector.wire.Record (or any object with the same attributes). One record:
        `add_many` without its per-frame set-up (single-record frames are the slower path).
        Takes no lock: while a load of stored records runs, `hold` puts `_locked_add` in its
        place for this run."""
        self.count += 1
        self.last_t = rec.t
        self.arrived = time.time()
        if not self.first_t:
            self.first_t = rec.t
        self.ranks.add(rec.rank)
        if rec.world > 1 and not self.multi:
            self.multi = True
        step = self._series_add(rec)
        self._recent_n += 1
        blk = self._singles
        if blk is not None and len(blk[0]) < SINGLES:
            blk[1].append(step)  # steps first: a reader goes by len(records)
            blk[0].append(rec)
        else:
            self._singles = ([rec], [step])
            self._push((self.count, *self._singles))

    def _series_add(self, rec) -> Optional[float]:
        """Into its series (and the full records of a small kind); its step, None if its
        series could not be made (MAX_SERIES)."""
        kind = rec.kind
        if kind in self.full:
            self.full[kind].append(rec)
            if kind == "events":
                if rec.name == "bye":
                    self.closed_ranks.add(rec.rank)
                elif rec.name == "hello":  # (also a new sender session of the rank: same run id)
                    self.closed_ranks.discard(rec.rank)
                    self.opened_ranks.add(rec.rank)
        name, split = rec.name, None
        if kind == "activations" and "split" in rec.data:  # (an evaluation's: `series_name`)
            split = eval_split(rec.data)
            if split is not None:
                name = series_name(name, split)
        key = (kind, name, rec.rank)
        s = self.series.get(key)
        if s is None:
            if len(self.series) >= MAX_SERIES:
                self.dropped_series += 1
                return None
            if split is not None:  # (before its series: a reader that finds the series finds this)
                self.splits.setdefault((kind, name), (rec.name, split))
            s = self.series[key] = Series()
        step = rec.step
        if step is None:
            step = s.n
        s.n += 1  # the stride check inline: most points of a long series are thinned out
        if not s.n % s.stride:
            s.append(step, rec.t, rec.data)
        return step

    def add_many(self, recs, rank: Optional[int] = None) -> None:
        """Records in arrival order (a frame's). rank: the rank of every one of them, when
        the caller knows it (one set update instead of one per record). No lock: see `add`."""
        first = self.count + 1
        self.count += len(recs)
        self.last_t = recs[-1].t
        self.arrived = time.time()
        if not self.first_t:
            self.first_t = next((r.t for r in recs if r.t), 0.0)
        if rank is None:
            self.ranks.update({r.rank for r in recs})
        else:
            self.ranks.add(rank)
        if not self.multi and recs[-1].world > 1:  # (a frame is one sender's: one world size)
            self.multi = True
        steps = [self._series_add(rec) for rec in recs]
        self._recent_n += len(recs)
        self._singles = None  # later single records start a new block, after this one
        self._push((first, recs, steps))

    def _push(self, block: tuple) -> None:
        # the payloads as they came: flattened only if a live view asks (`since`)
        self.recent.append(block)
        while self._recent_n - len(self.recent[0][1]) >= RECENT:
            self._recent_n -= len(self.recent.popleft()[1])

    # -- stored records (a restarted collector; see collector.load.load_stored) -------------
    def hold(self) -> None:
        """Until `release`, this run's adds take `lock`, so that a load of its stored records
        can merge meanwhile: `add` and `add_many` are replaced on this instance by the locked
        ones (every other run, and this one otherwise, pays nothing for it). Called on the
        ingest thread before the run's first live record."""
        self.lock = threading.Lock()
        self.add, self.add_many = self._locked_add, self._locked_add_many

    def release(self) -> None:
        """With `lock` held (or no add possible): adds take no lock from now on."""
        self.lock = None
        self.__dict__.pop("add", None)
        self.__dict__.pop("add_many", None)

    def _locked_add(self, rec) -> None:
        lock = self.lock
        if lock is None:  # released since the caller looked the method up
            return RunIndex.add(self, rec)
        with lock:
            RunIndex.add(self, rec)

    def _locked_add_many(self, recs, rank: Optional[int] = None) -> None:
        lock = self.lock
        if lock is None:
            return RunIndex.add_many(self, recs, rank)
        with lock:
            RunIndex.add_many(self, recs, rank)

    def add_stored(self, recs) -> None:
        """Stored records of one kind, in file order, into the series and the full records of
        this (private) index: no ring (they are not new), no `count` (the live cursor)."""
        if not recs:
            return
        add = self._series_add
        for rec in recs:
            add(rec)
        self.loaded += len(recs)
        self.ranks.update({r.rank for r in recs})
        self.multi = self.multi or any(r.world > 1 for r in recs)
        ts = [r.t for r in recs if r.t]
        if ts:
            self.first_t = min(self.first_t or math.inf, min(ts))
            self.last_t = max(self.last_t, max(ts))

    def merge_stored(self, stored: "RunIndex", chunk: int = 32, pause=None) -> None:
        """Put `stored` (a private index of this run's stored records) before what this index
        took in since: series by series, `chunk` at a time under `lock` (the ingest thread
        waits for one chunk at most), `pause()` between chunks. Then the full records, ranks,
        times and counts, and `lock` is cleared. Called on the loader thread only."""
        lock = self.lock
        assert lock is not None, "merge_stored needs `hold` before the first live record"
        keys = list(stored.series)
        for key, of in stored.splits.items():  # (before their series: a reader finds both)
            self.splits.setdefault(key, of)
        for i in range(0, len(keys), chunk):
            with lock:
                for key in keys[i:i + chunk]:
                    a = stored.series[key]
                    b = self.series.get(key)
                    if b is not None:
                        self.series[key] = Series.merged(a, b)
                    elif len(self.series) < MAX_SERIES:
                        self.series[key] = a
                    else:
                        self.dropped_series += a.n
            if pause is not None:
                pause()
        with lock:
            for kind, dq in stored.full.items():
                self.full[kind] = collections.deque(itertools.chain(dq, self.full[kind]), maxlen=MAX_FULL)
            # a rank's stored bye counts only if the rank sent nothing since
            self.closed_ranks = (stored.closed_ranks - self.ranks) | self.closed_ranks
            self.opened_ranks = self.opened_ranks | stored.opened_ranks
            self.ranks = self.ranks | stored.ranks
            self.multi = self.multi or stored.multi
            if stored.first_t and (not self.first_t or stored.first_t < self.first_t):
                self.first_t = stored.first_t
            self.last_t = max(self.last_t, stored.last_t)
            self.dropped_series += stored.dropped_series
            self.loaded += stored.loaded
            self.release()

    # -- reads ----------------------------------------------------------------------------
    def live(self, now: Optional[float] = None, idle_s: float = 15.0) -> bool:
        """A rank has not said bye and records arrived within idle_s (by the collector's clock)."""
        now = time.time() if now is None else now
        return bool(self.ranks - self.closed_ranks) and now - self.arrived < idle_s

    def state(self, now: Optional[float] = None) -> str:
        """"live"; "unclosed": not live, and a rank said hello but never bye (stopped without
        closing, killed, or paused); else "finished" (also a stored run without events)."""
        if self.live(now):
            return "live"
        return "unclosed" if self.opened_ranks - self.closed_ranks else "finished"

    def label(self, name: str, rank: int) -> str:
        """The name a series is shown and asked for by: its own for rank 0 and in a run of one
        rank (nothing changes for those), "name · rank r" for the other ranks."""
        return name if not rank or not (self.multi or len(self.ranks) > 1) else f"{name} · rank {rank}"

    def streams(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = collections.defaultdict(list)
        for (kind, name, rank), s in sorted(list(self.series.items()), key=lambda kv: kv[0][2]):
            of, split = self.splits.get((kind, name), (name, None))
            out[kind].append({"name": name, "rank": rank, "label": self.label(name, rank),
                              "points": s.points(), "stats": s.stats(), "of": of, "split": split})
        return dict(out)

    def find(self, kind: str, name: str, rank: Optional[int] = None) -> Optional[tuple[int, Series]]:
        """(rank, series) of `name` in `kind`: of that rank when given; else the lowest rank's,
        or the series whose label is `name` ("loss · rank 1"). None when there is none."""
        if rank is None and (kind, name, 0) in self.series:
            rank = 0  # the lowest there is: one lookup, not a scan (every single-rank run)
        if rank is not None:
            s = self.series.get((kind, name, rank))
            return None if s is None else (rank, s)
        found = [(r, s) for (k, n, r), s in list(self.series.items()) if k == kind and n == name]
        if not found:
            found = [(r, s) for (k, n, r), s in list(self.series.items())
                     if k == kind and self.label(n, r) == name]
        return min(found, key=lambda x: x[0]) if found else None

    def get_series(self, kind: str, name: str, stat: str, since: int = 0,
                   limit: int = 10_000, rank: Optional[int] = None) -> Optional[dict]:
        """Points [since, since+limit) of one statistic; None when the series is unknown
        (rank: see `find`)."""
        found = self.find(kind, name, rank)
        if found is None:
            return None
        rank, s = found
        rows, w, col, n = s.snapshot()
        since = min(since, n)
        end = min(n, since + limit)
        lo, hi = since * w, end * w
        j = col.get(stat)
        values = rows[lo + j:hi:w] if j is not None else [math.nan] * (end - since)
        return {"kind": kind, "name": name, "rank": rank, "stat": stat, "since": since, "next": end,
                "total": n, "step": rows[lo:hi:w].tolist(), "t": rows[lo + 1:hi:w].tolist(),
                "value": [None if v != v else v for v in values]}

    def series_stats(self, kind: str, name: str, rank: Optional[int] = None) -> Optional[list[str]]:
        """Statistic names of one series; None when it is unknown (rank: see `find`)."""
        found = self.find(kind, name, rank)
        return None if found is None else found[1].stats()

    def kind_series(self, kind: str, stats: Iterable[str], points: int = 2_000) -> dict[str, dict]:
        """Every series of one kind, each stat decimated to at most `points` (evenly spread,
        the first and the newest among them) for drawing: {label: {"step": [...], "t": [...],
        stat: [...]}}. NaN stays float('nan') (the dashboard's JSON encoder writes null)."""
        out = {}
        for (k, name, rank), s in sorted(list(self.series.items()), key=lambda kv: kv[0][2]):
            if k != kind:
                continue
            rows, w, col, n = s.snapshot()
            if n <= points:
                keep = range(n)
            else:  # `points` evenly spread, the first and the newest among them
                keep = [i * (n - 1) // (points - 1) for i in range(points)] if points > 1 else [n - 1]
            row = {"step": [rows[i * w] for i in keep], "t": [rows[i * w + 1] for i in keep]}
            for stat in stats:
                j = col.get(stat)
                if j is not None:
                    row[stat] = [rows[i * w + j] for i in keep]
            out[self.label(name, rank)] = row
        return out

    def records(self, kind: str) -> list[dict]:
        """Full records of a small kind (loader_stats, patch_metrics, events), oldest first."""
        import msgspec
        return [msgspec.structs.asdict(r) if hasattr(r, "__struct_fields__") else dict(r)
                for r in list(self.full.get(kind, ()))]

    def since(self, cursor: int, limit: int = 5_000) -> tuple[int, list[tuple]]:
        """Recent records after `cursor` (for live updates): (new cursor, [(i, kind, name,
        rank, step, t, flat_stats, label, record name, split), ...]); name: its series' (an
        evaluation's activation: "x · val", its split "val"; else the record's, split None).
        Older than the ring: starts at the ring's oldest."""
        items: list[tuple] = []
        one = not (self.multi or len(self.ranks) > 1)  # (`label` inline: every name is its own label)
        for first, recs, steps in list(self.recent):
            n = len(recs)  # a block of single records may grow meanwhile: up to here
            if first + n <= cursor + 1:
                continue  # all seen
            for j in range(max(0, cursor + 1 - first), n):
                if steps[j] is None:
                    continue
                r = recs[j]
                split = eval_split(r.data) if r.kind == "activations" else None
                name = r.name if split is None else series_name(r.name, split)
                items.append((first + j, r.kind, name, r.rank, steps[j], r.t, flatten(r.data),
                              name if one or not r.rank else self.label(name, r.rank), r.name, split))
                if len(items) >= limit:
                    return items[-1][0], items
        return (items[-1][0] if items else max(cursor, 0)), items


class Index:
    """All runs; the collector adds, the dashboard reads. `health` is a callable the
    collector provides returning its counters."""

    def __init__(self, health=None) -> None:
        self.runs: dict[str, RunIndex] = {}
        self._lock = threading.Lock()
        self.health = health or (lambda: {})

    def run(self, run: str, new: Optional[RunIndex] = None) -> RunIndex:
        """The run's index; made (or `new`, set up by the caller before readers can see it)
        if there is none."""
        r = self.runs.get(run)
        if r is None:
            with self._lock:
                r = self.runs.setdefault(run, new or RunIndex(run))
        return r

    def add(self, rec) -> None:
        (self.runs.get(rec.run) or self.run(rec.run)).add(rec)

    def get(self, run: str) -> Optional[RunIndex]:
        return self.runs.get(run)

    def summaries(self) -> list[dict]:
        now = time.time()
        return [{"run": r.run, "live": r.live(now), "state": r.state(now), "records": r.count + r.loaded,
                 "ranks": sorted(r.ranks),
                 "first_t": r.first_t, "last_t": r.last_t, "findings": len(r.findings),
                 "loading": r.loading is not None, "uncharted": r.dropped_series}
                for r in sorted(list(self.runs.values()), key=lambda r: r.first_t)]
