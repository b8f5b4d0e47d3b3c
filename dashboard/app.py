"""The dashboard: a JSON API over the collector's in-memory index, live updates by
server-sent events, and the static page at `/`.

The collector (the composition root) builds it with `create_app(index)` and hands it an
`Index` (collector/index.py), duck-typed: `runs`, `get(run)`, `summaries()`, `health()`.
This module only reads it. Answers are encoded with msgspec (NaN and Inf become null);
the pydantic models below only document the answers in the OpenAPI schema (`/docs`).
"""
from __future__ import annotations

import asyncio
import enum
import importlib.util
import threading
import time
from pathlib import Path
from typing import Any, Optional

import msgspec
from fastapi import FastAPI, Header, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from dashboard import metrics
from dashboard.security import Guard

STATIC = Path(__file__).parent / "static"
RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # collector.wire.RUN_ID_PATTERN
SSE_INTERVAL_S = 0.010  # how often a live stream looks for new records (latency floor)
SSE_HEARTBEAT_S = 1.0  # a quiet stream still writes this often, so a gone client is noticed
SSE_MAX_S = 600.0  # then the stream ends; EventSource reconnects with Last-Event-ID

_encode = msgspec.json.Encoder().encode


class Kind(str, enum.Enum):
    loader_stats = "loader_stats"
    activations = "activations"
    gradients = "gradients"
    metrics = "metrics"
    events = "events"
    patch_metrics = "patch_metrics"


class SmallKind(str, enum.Enum):
    loader_stats = "loader_stats"
    patch_metrics = "patch_metrics"
    events = "events"


class RunSummary(BaseModel):
    run: str
    live: bool
    # "live"; "finished": every rank said bye; "unclosed": a rank never said bye and nothing
    # came for a while (stopped without closing, killed, or paused)
    state: str = "finished"
    loading: bool = False  # a restarted collector is putting the run's stored records back
    stored: bool = False  # collect's view of a run under its root that has sent nothing since it started
    records: int
    ranks: list[int]
    first_t: float
    last_t: float
    findings: int
    # records kept out of the series: the run has MAX_SERIES (4,096) series (still in its files)
    uncharted: int = 0


class StreamInfo(BaseModel):
    name: str  # the series' name: the records' name, or "name · val" for an evaluation's activations
    rank: int = 0
    label: str  # the key of the series in /kind/{kind}: its name, "name · rank r" for ranks > 0
    points: int
    stats: list[str]
    of: str  # the records' name
    split: Optional[str] = None  # the evaluation an activation series was taken in ("val"), else null


class SeriesOut(BaseModel):
    kind: str
    name: str
    rank: int
    stat: str
    since: int
    next: int
    total: int
    step: list[float]
    t: list[float]
    value: list[Optional[float]]


class KindSeriesOut(BaseModel):
    kind: str
    cursor: int
    series: dict[str, dict[str, list[Optional[float]]]]


class Problem(BaseModel):
    detail: str


NOT_FOUND = {404: {"model": Problem, "description": "unknown run or series"}}


def _json(obj: Any) -> Response:
    return Response(_encode(obj), media_type="application/json")


def plotly_js() -> Path:
    """plotly.min.js from the installed plotly wheel (served locally: the page needs no internet)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dashboard: the plotly package is not installed; pip install plotly")
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"dashboard: {path} is missing; reinstall the plotly wheel")
    return path


def takes_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip: named with a weight above 0, or not
    named and `*` above 0 (RFC 9110 12.5.3; "gzip;q=0" refuses it)."""
    named = star = None
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        coding, q = coding.strip(), 1.0
        for p in params.split(";"):
            k, _, v = p.partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            named = q > 0 if named is None else named or q > 0
        elif coding == "*":
            star = q > 0
    return named if named is not None else bool(star)


class Gzipped:
    """A static file's gzip bytes, made once at first request (plotly.min.js: 4.8 MB, 1.4 MB
    gzipped; what a page opened over a network waits for on its first visit)."""

    def __init__(self, path: Path) -> None:
        self.path, self._bytes, self._lock = path, None, threading.Lock()

    def get(self) -> bytes:
        if self._bytes is None:
            with self._lock:
                if self._bytes is None:
                    import gzip

                    self._bytes = gzip.compress(self.path.read_bytes(), compresslevel=6, mtime=0)
        return self._bytes


def create_app(index, *, token: Optional[str] = None, loopback_only: bool = True) -> FastAPI:
    """The dashboard app over `index` (read only).

    token: required on every request when set (Bearer header, ?token= or the cookie a valid
    ?token= sets). loopback_only: refuse requests whose Host is not a loopback name (DNS
    rebinding). Serving beyond loopback without a token is refused here too.
    """
    if not loopback_only and not token:
        raise ValueError("dashboard: serving beyond loopback requires a token (--token)")
    app = FastAPI(title="tensortap dashboard", version="1", docs_url="/docs", redoc_url=None,
                  description="Live and stored tensortap runs: gradient, activation, loader and "
                              "loss statistics, findings, collector health.")
    app.add_middleware(Guard, token=token, loopback_only=loopback_only)
    # set by the collector as it stops: open live streams end (else the server cancels them)
    app.state.closing = threading.Event()
    plotly_path = plotly_js()

    def get_run(run: str):
        ri = index.get(run)
        if ri is None:
            raise HTTPException(404, f"unknown run {run!r}")
        return ri

    RunId = PathParam(..., pattern=RUN_PATTERN, description="run id")

    # -- page -----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    plotly_gz = Gzipped(plotly_path)

    @app.get("/static/plotly.min.js", include_in_schema=False)
    async def plotly_file(accept_encoding: str = Header("")) -> Response:
        headers = {"cache-control": "max-age=86400", "vary": "accept-encoding"}
        if takes_gzip(accept_encoding):
            body = await asyncio.to_thread(plotly_gz.get)  # (the first time: ~0.3 s, off the event loop)
            return Response(body, media_type="text/javascript", headers={**headers, "content-encoding": "gzip"})
        return FileResponse(plotly_path, media_type="text/javascript", headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str = PathParam(..., pattern=r"^[a-z_]+\.(js|css|html)$")) -> FileResponse:
        path = STATIC / name
        if not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path, headers={"cache-control": "no-cache"})

    # -- API ------------------------------------------------------------------------------
    @app.get("/api/health", summary="Collector counters (received, written, rejected, gaps, "
             "dropped, queue bytes, ...)", response_model=dict[str, Any])
    async def health() -> Response:
        try:
            return _json(index.health())
        except Exception as e:  # the collector's counters must not take the view down
            raise HTTPException(503, f"health unavailable: {e!r}") from None

    @app.get("/metrics", summary="The collector's counters in Prometheus text format",
             response_class=PlainTextResponse)
    async def prometheus() -> Response:
        try:
            text = metrics.render(index.health())
        except Exception as e:
            raise HTTPException(503, f"metrics unavailable: {e!r}") from None
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/api/runs", summary="All runs, oldest first; `live` while a rank is sending",
             response_model=list[RunSummary])
    async def runs() -> Response:
        return _json(index.summaries())

    @app.get("/api/runs/{run}", summary="One run's summary", response_model=RunSummary,
             responses=NOT_FOUND)
    async def run_summary(run: str = RunId) -> Response:
        get_run(run)
        return _json(next(s for s in index.summaries() if s["run"] == run))

    @app.get("/api/runs/{run}/manifest", summary="The run's manifest (per rank: received, "
             "written, gaps, duplicates, dropped by sender)", response_model=dict[str, Any],
             responses=NOT_FOUND)
    async def manifest(run: str = RunId) -> Response:
        return _json(get_run(run).manifest)

    @app.get("/api/runs/{run}/streams", summary="Series of the run by kind and rank, with their "
             "statistics",
             response_model=dict[str, list[StreamInfo]], responses=NOT_FOUND)
    async def streams(run: str = RunId) -> Response:
        return _json(get_run(run).streams())

    @app.get("/api/runs/{run}/series", summary="Points [since, since+limit) of one statistic "
             "of one series", response_model=SeriesOut, responses=NOT_FOUND)
    async def series(run: str = RunId, kind: Kind = Query(...),
                     name: str = Query(..., min_length=1, max_length=256),
                     stat: str = Query(..., min_length=1, max_length=256),
                     since: int = Query(0, ge=0, le=2**62), limit: int = Query(10_000, ge=1, le=100_000),
                     rank: Optional[int] = Query(None, ge=0, le=2**31, description="the rank's series; "
                                                 "unset: the lowest rank's (or `name` is a label)")) -> Response:
        ri = get_run(run)
        stats = ri.series_stats(kind.value, name, rank)
        if stats is None:
            of = "" if rank is None else f" of rank {rank}"
            raise HTTPException(404, f"unknown series {kind.value}/{name!r}{of} in run {run!r}")
        if stat not in stats:
            raise HTTPException(404, f"series {kind.value}/{name!r} has no statistic {stat!r}")
        return _json(ri.get_series(kind.value, name, stat, since=since, limit=limit, rank=rank))

    @app.get("/api/runs/{run}/kind/{kind}", summary="Every series of a kind by label (its name; "
             "'name · rank r' for ranks > 0 of a run of several), chosen statistics, decimated to "
             "at most `points` each (for drawing)", response_model=KindSeriesOut,
             responses=NOT_FOUND)
    async def kind_series(run: str = RunId, kind: Kind = PathParam(...),
                          stat: list[str] = Query(..., min_length=1, max_length=64),
                          points: int = Query(2_000, ge=2, le=100_000)) -> Response:
        ri = get_run(run)
        cursor = ri.count  # read first: a live stream from here may repeat a point, never miss one
        return _json({"kind": kind.value, "cursor": cursor,
                      "series": ri.kind_series(kind.value, stat, points)})

    @app.get("/api/runs/{run}/records/{kind}", summary="Full records of a small kind, oldest first",
             response_model=list[dict[str, Any]], responses=NOT_FOUND)
    async def records(run: str = RunId, kind: SmallKind = PathParam(...)) -> Response:
        return _json(get_run(run).records(kind.value))

    @app.get("/api/runs/{run}/findings", summary="Diagnosis of the run: what looks wrong, with "
             "evidence", response_model=list[dict[str, Any]], responses=NOT_FOUND)
    async def findings(run: str = RunId) -> Response:
        return _json(list(get_run(run).findings))

    @app.get("/api/runs/{run}/live", summary="Server-sent events: new records of the run",
             response_class=StreamingResponse, responses={
                 **NOT_FOUND, 200: {"content": {"text/event-stream": {}},
                                    "description": "events `data: {cursor, items: [[i, kind, "
                                    "name, rank, step, t, stats, label, record name, split], ...], "
                                    "findings (how many), findings_rev (changes when they do), live, "
                                    "state, records}`"}})
    async def live(request: Request, run: str = RunId,
                   cursor: int = Query(-1, ge=-1, le=2**62, description="-1: from now on"),
                   kinds: Optional[list[Kind]] = Query(None, description="only these kinds"),
                   last_event_id: Optional[str] = Header(None)) -> StreamingResponse:
        ri = get_run(run)
        lei = last_event_id
        if lei is not None and lei.isascii() and lei.isdigit() and len(lei) <= 18:
            cursor = int(lei)  # EventSource reconnect (isdigit alone takes "²", int() not)
        if cursor < 0 or cursor > ri.count:  # a cursor from before a restart: from now on
            cursor = ri.count
        wanted = {k.value for k in kinds} if kinds else None
        return StreamingResponse(_live_events(ri, cursor, wanted, app.state.closing),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    return app


async def _live_events(ri, cursor: int, wanted: Optional[set], closing: threading.Event):
    """Poll the run's ring of recent records every SSE_INTERVAL_S; send what is new. Ends
    when the server closes (the page's EventSource then retries until it is back)."""
    yield b"retry: 1000\n\n"
    start = last_sent = time.monotonic()
    state = None
    while time.monotonic() - start < SSE_MAX_S and not closing.is_set():
        cursor, items = ri.since(cursor, 5_000)
        full = len(items) >= 5_000  # more is waiting: no sleep
        if wanted is not None:
            items = [it for it in items if it[1] in wanted]
        now_state = (len(ri.findings), ri.state(), ri.findings_rev)
        now = time.monotonic()
        if items or now_state != state or now - last_sent >= SSE_HEARTBEAT_S:
            state, last_sent = now_state, now
            body = _encode({"cursor": cursor, "items": items, "findings": now_state[0],
                            "findings_rev": now_state[2], "live": now_state[1] == "live", "state": now_state[1],
                            "records": ri.count + ri.loaded})
            yield b"id: %d\ndata: %s\n\n" % (cursor, body)
        await asyncio.sleep(0 if full else SSE_INTERVAL_S)
