"""The dashboard's JSON API: every endpoint, unknown runs and series, bad parameters, the
Host and token guards, and live updates over a real socket."""
from __future__ import annotations

import contextlib
import json
import math
import time

import httpx
import pytest

from collector.index import Index
from dashboard.app import create_app
from tests.dashboard.conftest import XSS, fill_run, rec, serve, stats


@contextlib.contextmanager
def client_for(app):
    """A real uvicorn server on a free loopback port, and an HTTP client for it.
    (starlette's TestClient warns about its httpx; warnings are errors here.)"""
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        yield c


@pytest.fixture
def client(index):
    with client_for(create_app(index)) as c:
        yield c


def test_health_returns_the_collectors_counters(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json()["received"] == 10 and r.json()["status"] == "ok"


def test_runs_lists_each_run_with_its_summary(client, index):
    fill_run(index, "run-b", t0=time.time() - 5)
    runs = client.get("/api/runs").json()
    assert [r["run"] for r in runs] == ["run-a", "run-b"]
    a = runs[0]
    assert a["records"] == index.get("run-a").count and a["ranks"] == [0] and a["findings"] == 1
    assert a["live"] is False  # its rank said bye
    assert client.get("/api/runs/run-a").json() == a


def test_a_run_that_is_sending_is_marked_live(client, index):
    index.add(rec("run-live", "metrics", "loss", {"value": 1.0}, step=0))
    assert client.get("/api/runs/run-live").json()["live"] is True


def test_manifest_streams_and_findings_of_a_run(client):
    assert client.get("/api/runs/run-a/manifest").json()["ranks"]["0"]["gaps"] == 0
    streams = client.get("/api/runs/run-a/streams").json()
    assert {s["name"] for s in streams["gradients"]} == {"enc.0", "dec.3"}
    grad = next(s for s in streams["gradients"] if s["name"] == "enc.0")
    assert grad["points"] == 20 and {"mean", "std", "norm"} <= set(grad["stats"])
    x = next(s for s in streams["activations"] if s["name"] == "x_combined")
    assert "abs.mean" in x["stats"] and "angle.std" in x["stats"]
    assert client.get("/api/runs/run-a/findings").json()[0]["rule"] == "flat_loss"


def test_series_pages_with_since_and_limit(client):
    q = {"kind": "metrics", "name": "loss", "stat": "value"}
    full = client.get("/api/runs/run-a/series", params=q).json()
    assert full["total"] == 20 and full["step"] == list(range(20))
    assert full["value"][3] == pytest.approx(0.25)
    page = client.get("/api/runs/run-a/series", params={**q, "since": 5, "limit": 4}).json()
    assert page["step"] == [5, 6, 7, 8] and page["next"] == 9
    assert page["value"] == full["value"][5:9]


def test_series_nan_and_inf_come_back_as_null(client, index):
    index.add(rec("run-a", "metrics", "loss", {"value": math.nan}, step=20))
    index.add(rec("run-a", "metrics", "loss", {"value": math.inf}, step=21))
    r = client.get("/api/runs/run-a/series", params={"kind": "metrics", "name": "loss",
                                                     "stat": "value", "since": 20})
    assert r.status_code == 200 and r.json()["value"] == [None, None]
    assert "NaN" not in r.text and "Infinity" not in r.text


def test_kind_series_returns_every_layer_decimated(client, index):
    fill_run(index, "long", steps=500)
    r = client.get("/api/runs/long/kind/gradients", params={"stat": ["norm", "mean"], "points": 100})
    body = r.json()
    assert set(body["series"]) == {"enc.0", "dec.3"} and body["cursor"] == index.get("long").count
    row = body["series"]["enc.0"]
    assert len(row["step"]) == 100 and row["step"][0] == 0 and row["step"][-1] == 499  # (101 before)
    gaps = [b - a for a, b in zip(row["step"], row["step"][1:])]
    assert min(gaps) >= 5 and max(gaps) <= 6  # evenly spread
    for points in (2, 3, 10):
        r = client.get("/api/runs/long/kind/gradients", params={"stat": "norm", "points": points}).json()
        assert len(r["series"]["enc.0"]["step"]) == points and r["series"]["enc.0"]["step"][-1] == 499
    assert len(row["norm"]) == len(row["step"]) and row["norm"][-1] == pytest.approx(0.1 / 500)
    assert "std" not in row


def test_records_of_small_kinds_are_full_records(client):
    loader = client.get("/api/runs/run-a/records/loader_stats").json()
    assert [r["name"] for r in loader] == ["images", "probe", "val_loader"]
    assert loader[1]["data"]["imag"]["mean"] == -0.1 and loader[1]["data"]["dtype"] == "complex64"
    patch = client.get("/api/runs/run-a/records/patch_metrics").json()
    assert patch[-1]["data"]["scaling"] == "none (raw amplitude)"
    assert [e["name"] for e in client.get("/api/runs/run-a/records/events").json()] == ["hello", "bye"]


@pytest.mark.parametrize("path", ["/api/runs/nope", "/api/runs/nope/manifest", "/api/runs/nope/streams",
                                  "/api/runs/nope/findings", "/api/runs/nope/records/events",
                                  "/api/runs/nope/kind/metrics?stat=value", "/api/runs/nope/live",
                                  "/api/runs/nope/series?kind=metrics&name=loss&stat=value"])
def test_unknown_run_is_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "unknown run" in r.json()["detail"]


@pytest.mark.parametrize("params,what", [({"name": "nope", "stat": "value"}, "unknown series"),
                                         ({"name": "loss", "stat": "nope"}, "no statistic")])
def test_unknown_series_or_stat_is_404(client, params, what):
    r = client.get("/api/runs/run-a/series", params={"kind": "metrics", **params})
    assert r.status_code == 404 and what in r.json()["detail"]


@pytest.mark.parametrize("path", [
    "/api/runs/run-a/series?kind=bogus&name=loss&stat=value",  # unknown kind
    "/api/runs/run-a/series?kind=metrics&stat=value",  # name missing
    "/api/runs/run-a/series?kind=metrics&name=loss&stat=value&since=-1",
    "/api/runs/run-a/series?kind=metrics&name=loss&stat=value&since=abc",
    "/api/runs/run-a/series?kind=metrics&name=loss&stat=value&limit=0",
    "/api/runs/run-a/series?kind=metrics&name=loss&stat=value&limit=100001",
    "/api/runs/run-a/series?kind=metrics&name=&stat=value",
    "/api/runs/run-a/kind/metrics",  # stat missing
    "/api/runs/run-a/kind/bogus?stat=value",
    "/api/runs/run-a/kind/metrics?stat=value&points=1",
    "/api/runs/run-a/records/gradients",  # not a small kind
    "/api/runs/run-a/live?cursor=-2",
    "/api/runs/run-a/live?kinds=bogus",
    "/api/runs/a%20b/manifest",  # not a run id
    "/api/runs/.hidden/streams",
])
def test_bad_parameters_are_422(client, path):
    r = client.get(path)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("path", ["/api/runs/..%2F..%2Fetc/manifest", "/api/runs/x/../../etc/passwd",
                                  "/static/..%2F..%2Fapp.py", "/static/%2e%2e/app.py"])
def test_path_traversal_finds_nothing(client, path):
    r = client.get(path)
    assert r.status_code in (404, 422) and "import" not in r.text


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ["/api/health", "/api/runs", "/api/runs/{run}", "/api/runs/{run}/manifest",
              "/api/runs/{run}/streams", "/api/runs/{run}/series", "/api/runs/{run}/kind/{kind}",
              "/api/runs/{run}/records/{kind}", "/api/runs/{run}/findings", "/api/runs/{run}/live"]:
        assert p in paths, p
    assert client.get("/docs").status_code == 200


def test_page_and_local_plotly_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/plotly.min.js" in page.text
    assert "cdn" not in page.text.lower()
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and b"plotly.js v" in js.content[:200]
    # gzipped for a browser that takes it (4.8 MB -> ~1.4 MB over a network), whole otherwise
    from dashboard.app import plotly_js

    whole = plotly_js().read_bytes()
    assert js.headers["content-encoding"] == "gzip" and js.content == whole
    assert int(js.headers["content-length"]) < len(whole) / 2
    plain = client.get("/static/plotly.min.js", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == whole
    # a weight of 0 refuses gzip (RFC 9110); another coding's weight or `*` does not
    for accept, gz in [("gzip;q=0", False), ("GZIP; Q=0.0, identity", False), ("br, gzip;q=0.5", True),
                       ("*", True), ("*;q=0", False), ("gzip;q=0, *", False), ("deflate, br", False)]:
        r = client.get("/static/plotly.min.js", headers={"accept-encoding": accept})
        assert (r.headers.get("content-encoding") == "gzip") is gz, accept
        assert r.content == whole, accept
    for f in ["app.js", "charts.js", "style.css"]:
        assert client.get("/static/" + f).status_code == 200
    assert client.get("/static/nope.js").status_code == 404
    assert "script-src 'self'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8050", "127.0.0.1.evil.example", "10.0.0.1:8050"])
def test_non_loopback_host_header_is_refused(index, host):
    with client_for(create_app(index)) as c:
        r = c.get("/api/runs", headers={"host": host})
    assert r.status_code == 421


@pytest.mark.parametrize("host", ["127.0.0.1:8050", "localhost:8050", "[::1]:8050", "localhost"])
def test_loopback_host_header_is_served(index, host):
    with client_for(create_app(index)) as c:
        assert c.get("/api/runs", headers={"host": host}).status_code == 200


def test_token_is_required_when_configured(index):
    with client_for(create_app(index, token="s3cret", loopback_only=False)) as c:
        assert c.get("/api/runs", headers={"host": "dash.example"}).status_code == 401
        assert c.get("/api/runs", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/?token=s3cret")  # the page's link: sets a cookie for its scripts
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert c.get("/static/app.js").status_code == 200  # the cookie is sent now
        c.cookies.clear()
        assert c.get("/static/app.js").status_code == 401


def test_serving_beyond_loopback_without_a_token_is_refused(index):
    with pytest.raises(ValueError, match="token"):
        create_app(index, loopback_only=False)


def _sse_events(url: str, want: int, timeout: float = 10.0) -> list[dict]:
    events = []
    with httpx.Client(timeout=timeout) as c, c.stream("GET", url) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if sum(len(e["items"]) for e in events) >= want:
                    break
    return events


def test_live_stream_sends_new_records_of_the_run(index):
    index.add(rec("run-live", "metrics", "loss", {"value": 3.0}, step=0))
    with serve(create_app(index)) as url:
        cursor = index.get("run-live").count

        def push_later():
            time.sleep(0.3)
            for i in range(1, 4):
                index.add(rec("run-live", "gradients", XSS, {"norm": float(i)}, step=i))

        import threading
        threading.Thread(target=push_later, daemon=True).start()
        t0 = time.monotonic()
        events = _sse_events(f"{url}/api/runs/run-live/live?cursor={cursor}", want=3)
        items = [it for e in events for it in e["items"]]
        assert [(it[1], it[2], it[4], it[6]["norm"]) for it in items] == [
            ("gradients", XSS, i, float(i)) for i in range(1, 4)]
        assert time.monotonic() - t0 < 2.0
        assert events[-1]["cursor"] == index.get("run-live").count and events[-1]["live"] is True
        # a reconnect with Last-Event-ID resumes after what was seen
        index.add(rec("run-live", "metrics", "loss", {"value": 9.0}, step=9))
        with httpx.Client(timeout=10) as c, c.stream("GET", f"{url}/api/runs/run-live/live",
                                                     headers={"last-event-id": str(cursor + 3)}) as r:
            data = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
        assert [(it[1], it[6]["value"]) for it in data["items"]] == [("metrics", 9.0)]


def test_live_stream_filters_kinds(index):
    with serve(create_app(index)) as url:
        cursor = index.get("run-a").count
        index.add(rec("run-a", "gradients", "enc.0", {"norm": 1.0}, step=99))
        index.add(rec("run-a", "metrics", "loss", {"value": 0.5}, step=99))
        events = _sse_events(f"{url}/api/runs/run-a/live?cursor={cursor}&kinds=metrics", want=1)
        assert [it[1] for e in events for it in e["items"]] == ["metrics"]


def test_empty_index_answers_without_errors():
    with client_for(create_app(Index())) as c:
        assert c.get("/api/runs").json() == []
        assert c.get("/api/health").json() == {}


def test_the_live_ring_keeps_at_least_the_last_records_of_single_and_batched_adds(monkeypatch):
    """The ring of recent records holds frames as blocks and single records in shared blocks;
    `since` numbers them 1.. in arrival order, starts at the oldest kept when the cursor is
    older, honours `limit`, and skips records kept out of the series (MAX_SERIES)."""
    from collector import index as ix

    monkeypatch.setattr(ix, "RECENT", 10)
    monkeypatch.setattr(ix, "SINGLES", 4)
    monkeypatch.setattr(ix, "MAX_SERIES", 2)
    ri = Index().run("ring")
    one = lambda i, name="loss": ri.add(rec("ring", "metrics", name, {"value": float(i)}, step=i))  # noqa: E731
    many = lambda lo, hi: ri.add_many([rec("ring", "metrics", "loss", {"value": float(i)}, step=i)  # noqa: E731
                                       for i in range(lo, hi)], 0)
    for i in range(1, 8):
        one(i)
    many(8, 13)
    for i in range(13, 16):
        one(i)
    assert [it[0] for it in ri.since(0)[1]] == list(range(1, 16))  # 15 kept: trimmed per block
    many(16, 21)  # the two oldest blocks (4 + 3 single records) go; 13 >= RECENT stay
    cursor, items = ri.since(0)
    assert [it[0] for it in items] == list(range(8, 21)) and cursor == 20
    assert [(it[4], it[6]["value"]) for it in items] == [(i, float(i)) for i in range(8, 21)]
    assert ri.since(14)[1][0][0] == 15 and ri.since(20) == (20, [])
    cursor, items = ri.since(3, limit=2)
    assert cursor == 9 and [it[0] for it in items] == [8, 9]
    one(21, "other")  # a second series
    one(22, "third")  # over MAX_SERIES: counted, not indexed, not streamed
    one(23)
    assert ri.count == 23 and ri.dropped_series == 1
    assert [(it[0], it[2]) for it in ri.since(20)[1]] == [(21, "other"), (23, "loss")]


def test_ranks_of_a_ddp_run_are_separate_series(tmp_path):
    """Two ranks of one run, through a real collector: each rank's loss (and gradients and
    activations) is its own series; rank 0 keeps the plain name, rank 1 is "name · rank 1".
    (They were one series whose steps went 0..15, 0..15, 16..19, 16..19: a zigzag.)"""
    from tests.dashboard.conftest import collector_process, two_ranks, wait_for

    with collector_process(str(tmp_path)) as info, httpx.Client(base_url=info["http"], timeout=10) as c:
        senders = two_ranks(info["zmq"])
        try:
            assert wait_for(lambda: c.get("/api/runs/ddp").json().get("records", 0) >= 120)
        finally:
            for s in senders:
                s.close()
        got = c.get("/api/runs/ddp/kind/metrics", params={"stat": "value"}).json()["series"]
        assert list(got) == ["loss", "loss · rank 1"]
        for label, value in (("loss", 1.0), ("loss · rank 1", 2.0)):
            assert got[label]["step"] == list(range(20)) and got[label]["value"] == [value] * 20
        grads = c.get("/api/runs/ddp/kind/gradients", params={"stat": "norm"}).json()["series"]
        assert {k: v["norm"][0] for k, v in grads.items()} == {"enc.0": 0.1, "enc.0 · rank 1": 0.2}
        acts = c.get("/api/runs/ddp/kind/activations", params={"stat": "mean"}).json()["series"]
        assert {k: v["mean"][-1] for k, v in acts.items()} == {"model_input": 0.0, "model_input · rank 1": 1.0}
        streams = c.get("/api/runs/ddp/streams").json()["metrics"]
        assert [(s["name"], s["rank"], s["label"], s["points"]) for s in streams] == [
            ("loss", 0, "loss", 20), ("loss", 1, "loss · rank 1", 20)]
        # /series: rank 0's by default (as before for a single rank), another by rank= or label
        q = {"kind": "metrics", "name": "loss", "stat": "value"}
        assert c.get("/api/runs/ddp/series", params=q).json()["value"] == [1.0] * 20
        one = c.get("/api/runs/ddp/series", params={**q, "rank": 1}).json()
        assert one["value"] == [2.0] * 20 and one["step"] == list(range(20)) and one["rank"] == 1
        assert c.get("/api/runs/ddp/series", params={**q, "name": "loss · rank 1"}).json()["value"] == [2.0] * 20
        assert c.get("/api/runs/ddp/series", params={**q, "rank": 5}).status_code == 404


def test_a_single_rank_run_keeps_its_names_whatever_its_rank():
    index = Index()
    index.add(rec("r3", "metrics", "loss", {"value": 1.0}, step=0, rank=3))
    ri = index.get("r3")
    assert list(ri.kind_series("metrics", ["value"])) == ["loss"]
    assert ri.since(0)[1][0][7] == "loss" and ri.get_series("metrics", "loss", "value")["rank"] == 3


def test_a_rank_that_comes_first_is_labelled_by_its_rank_from_the_start():
    """A DDP run whose rank 1 sends before rank 0: its records say world 2, so its series is
    "loss · rank 1" from the first record, loaded and live (it was "loss" until rank 0 came,
    and the page kept a trace "loss" of rank 1's first points)."""
    index = Index()
    index.add(rec("ddp", "metrics", "loss", {"value": 2.0}, step=0, rank=1, world=2))
    ri = index.get("ddp")
    assert list(ri.kind_series("metrics", ["value"])) == ["loss · rank 1"]
    assert ri.since(0)[1][0][7] == "loss · rank 1"
    assert [s["label"] for s in ri.streams()["metrics"]] == ["loss · rank 1"]
    index.add(rec("ddp", "metrics", "loss", {"value": 1.0}, step=0, rank=0, world=2))
    assert sorted(ri.kind_series("metrics", ["value"])) == ["loss", "loss · rank 1"]
    assert [it[7] for it in ri.since(0)[1]] == ["loss · rank 1", "loss"]


def test_an_evaluations_activations_are_a_series_of_their_own_served_by_name():
    """Activations whose data say {"split": "val"} (record(always=True) in an evaluation) are
    the series "model_input · val", apart from the training's: listed, served (the name in the
    query), and so named live; another kind's split (a loader batch's) changes nothing."""
    index = Index()
    for step in range(3):
        index.add(rec("ev", "activations", "model_input", stats(0.0), step=step, seq=step))
    for i in range(2):
        index.add(rec("ev", "activations", "model_input", stats(5.0, split="val"), step=2, seq=3 + i))
    index.add(rec("ev", "loader_stats", "x", stats(1.0, split="val", batch=0), step=2, seq=5))
    index.add(rec("ev", "activations", "model_input", stats(0.0, split="train"), step=3, seq=6))
    ri = index.get("ev")
    index.add(rec("ev", "activations", "loss · scaled", stats(1.0), step=3, seq=7))  # a name with " · "
    acts = ri.streams()["activations"]
    assert [(s["name"], s["points"], s["of"], s["split"]) for s in acts] == [
        ("model_input", 4, "model_input", None), ("model_input · val", 2, "model_input", "val"),
        ("loss · scaled", 1, "loss · scaled", None)]
    assert [(s["name"], s["split"]) for s in ri.streams()["loader_stats"]] == [("x", None)]
    train = ("model_input", "model_input", "model_input", None)
    val = ("model_input · val", "model_input · val", "model_input", "val")
    assert [it[2:3] + it[7:] for it in ri.since(0)[1] if it[1] == "activations"] == \
        [train] * 3 + [val] * 2 + [train, ("loss · scaled",) * 3 + (None,)]
    with client_for(create_app(index)) as c:
        got = c.get("/api/runs/ev/series", params={"kind": "activations", "name": "model_input · val",
                                                   "stat": "mean"}).json()
        assert got["step"] == [2.0, 2.0] and got["value"] == [5.0, 5.0]
        kind = c.get("/api/runs/ev/kind/activations", params={"stat": "mean"}).json()["series"]
        assert kind["model_input"]["mean"] == [0.0] * 4 and kind["model_input · val"]["mean"] == [5.0, 5.0]
        listed = c.get("/api/runs/ev/streams").json()["activations"]
        assert [(s["of"], s["split"]) for s in listed] == [("model_input", None), ("model_input", "val"),
                                                         ("loss · scaled", None)]


def test_records_past_the_series_limit_are_counted_in_the_runs_summary(monkeypatch):
    """A run with MAX_SERIES series keeps the records of further ones out of the index (they
    are in its files): the summary says how many ("uncharted"), the page's head shows it."""
    from collector import index as index_mod

    monkeypatch.setattr(index_mod, "MAX_SERIES", 3)
    index = Index()
    for i in range(5):
        index.add(rec("many", "activations", f"a{i}", stats(0.0), step=0, seq=i))
    index.add(rec("many", "activations", "a4", stats(0.0), step=1, seq=5))
    (summary,) = index.summaries()
    assert summary["uncharted"] == 3 and len(index.get("many").series) == 3
    with client_for(create_app(index)) as c:
        assert c.get("/api/runs/many").json()["uncharted"] == 3


def test_a_run_that_went_quiet_without_a_bye_is_unclosed_not_finished(index):
    """The run's state: live; finished once every rank said bye; unclosed when a rank never
    said bye and nothing came for a while (a killed training). The page's badge said
    "finished" for both."""
    index.add(rec("killed", "events", "hello", {"pid": 1, "host": "h", "world": 1}, seq=0))
    index.add(rec("killed", "metrics", "loss", {"value": 1.0}, step=0, seq=1))
    ri = index.get("killed")
    assert ri.state() == "live" and ri.state(now=time.time() + 16) == "unclosed"
    assert index.get("run-a").state() == "finished"  # (its rank said bye)
    ri.arrived -= 100
    with client_for(create_app(index)) as c:
        states = {r["run"]: (r["state"], r["live"]) for r in c.get("/api/runs").json()}
        assert states == {"run-a": ("finished", False), "killed": ("unclosed", False)}
        assert c.get("/api/runs/killed").json()["state"] == "unclosed"
        with c.stream("GET", "/api/runs/killed/live") as r:
            data = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
        assert data["state"] == "unclosed" and data["live"] is False


def test_liveness_goes_by_arrival_not_by_the_records_own_time():
    """A replay re-sends a stored run's original wall times: records an hour old that arrive
    now are live; records that stop arriving are not, after the idle time."""
    index = Index()
    index.add(rec("replayed", "metrics", "loss", {"value": 1.0}, step=0, t=time.time() - 3600))
    ri = index.get("replayed")
    assert ri.live() and index.summaries()[0]["live"]
    assert not ri.live(now=time.time() + 16)


def test_a_non_ascii_digit_last_event_id_is_ignored_not_a_500(index):
    """str.isdigit() takes "²" (and int() does not): a Last-Event-ID of it gave a 500."""
    with serve(create_app(index)) as url, httpx.Client(timeout=10) as c:
        for value in (b"\xb2", "9" * 5000):
            with c.stream("GET", f"{url}/api/runs/run-a/live", headers={"last-event-id": value}) as r:
                assert r.status_code == 200
                data = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
            assert data["cursor"] == index.get("run-a").count  # from now on


def test_the_findings_revision_moves_only_when_the_findings_change(index):
    """The diagnosis sets a run's findings each round; the live stream tells the page to fetch
    them again by `findings_rev`, which moves only when they differ (a finding rewritten with
    the same count of findings is a change: the page kept the old text)."""
    ri = index.get("run-a")
    rev = ri.findings_rev
    ri.findings = [dict(f) for f in ri.findings]  # the same again
    assert ri.findings_rev == rev
    ri.findings = ri.findings[:-1] + [{"rule": "loss_plateau", "severity": "high", "hint": "30 of 60 steps"}]
    assert ri.findings_rev == rev + 1
    with client_for(create_app(index)) as c, c.stream("GET", "/api/runs/run-a/live") as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["findings_rev"] == rev + 1


def test_evaluation_splits_past_the_series_limit_keep_no_bookkeeping(monkeypatch):
    """A run at MAX_SERIES series: an evaluation's records of new (name, split) pairs are kept
    out and counted, and leave nothing behind in the index (the split table grew by one entry
    for each, past the memory bound)."""
    from collector import index as index_mod

    monkeypatch.setattr(index_mod, "MAX_SERIES", 2)
    index = Index()
    for i in range(2):
        index.add(rec("full", "activations", "x", stats(0.0, split=f"val{i}"), step=0, seq=i))
    for i in range(2, 500):
        index.add(rec("full", "activations", "x", stats(0.0, split=f"val{i}"), step=0, seq=i))
    ri = index.get("full")
    assert len(ri.series) == 2 and len(ri.splits) == 2 and ri.dropped_series == 498
