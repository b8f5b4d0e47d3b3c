"""The page in a real browser (Debian's Chromium driven by Playwright): it loads a run, a
live record pushed through a real collector appears in a chart, a finding appears in the
panel, and a hostile layer name renders as text. Saves test-artifacts/dashboard.png."""
from __future__ import annotations

import math
import os
import shutil
import time

import pytest

from collector.index import Index
from dashboard.app import create_app
from tests.dashboard.conftest import REPO, XSS, collector_process, fill_run, free_port, rec, serve, stats

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium on PATH "
                                 "(apt-get install chromium); Playwright's own download is not used")]
ARTIFACTS = os.path.join(REPO, "test-artifacts")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page that records script errors, CSP violations and dialogs (none may happen)."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.problems = []
    pg.on("pageerror", lambda e: pg.problems.append(f"pageerror: {e}"))
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("dialog", lambda d: (pg.problems.append(f"dialog: {d.message}"), d.dismiss()))
    yield pg
    ctx.close()


def chart_has(page, chart_id: str, x, timeout_ms: int = 10_000) -> None:
    page.wait_for_function(
        """([id, x]) => { const d = document.getElementById(id);
             return !!(d && d.data && d.data.some(t => Array.from(t.x).includes(x))); }""",
        arg=[chart_id, x], timeout=timeout_ms)


def leave(page) -> None:
    """Close the page's live stream before its server stops (else the stop waits for it)."""
    page.goto("about:blank")


def test_page_shows_a_run_and_a_new_finding_appears(page):
    index = Index(health=lambda: {"status": "ok", "received": 120, "written": 120, "rejected": 0,
                                  "gaps": 2, "dropped_by_sender": 0, "queue_bytes": 0})
    fill_run(index, "before-fix", steps=40, t0=time.time() - 100)
    fill_run(index, "after-fix", steps=40, t0=time.time() - 50)
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=after-fix&cmp=before-fix")
        chart_has(page, "chart-metrics", 39)
        chart_has(page, "chart-grad-norm", 39)
        page.wait_for_selector("#findings .finding")
        assert "loss barely moves" in page.inner_text("#findings")
        loader = page.inner_text("#loader")
        for word in ("images", "probe", "real", "imag", "abs", "val_loader", "complex64"):
            assert word in loader
        assert "none (raw amplitude)" in page.inner_text("#patch-scaling")
        assert "gaps" in page.inner_text("#health")
        names = page.evaluate("document.getElementById('chart-metrics').data.map(t => t.name)")
        assert names == ["loss", "before-fix · loss"]  # the overlay run, drawn dotted, by its name (was "cmp")
        assert page.evaluate("document.getElementById('chart-grad-norm').layout.yaxis.type") == "log"
        # the collector's diagnosis adds a finding: the open page shows it without a reload
        index.get("after-fix").findings = index.get("after-fix").findings + [
            {"rule": "dead_gradients", "severity": "error", "message": "dec.3 gradient is zero"}]
        page.wait_for_function("() => document.getElementById('findings').innerText"
                               ".includes('dec.3 gradient is zero')", timeout=5_000)
        # ... and a finding rewritten with as many findings as before (a live plateau's numbers)
        index.get("after-fix").findings = index.get("after-fix").findings[:-1] + [
            {"rule": "dead_gradients", "severity": "error", "message": "dec.3 gradient is zero since step 7"}]
        page.wait_for_function("() => document.getElementById('findings').innerText"
                               ".includes('zero since step 7')", timeout=5_000)
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard.png"), full_page=True)
        leave(page)
    assert page.problems == []


def test_the_runs_head_findings_and_tables_show_before_plotly_has_run(page):
    """plotly.min.js takes about a second to compile on a first visit; the page asks for the
    run's data first and shows what needs no chart meanwhile. Here the script is held back
    until the test lets it go: the head, findings and tables are there without it, then the
    charts and the live stream come."""
    index = Index(health=lambda: {"status": "ok"})
    fill_run(index, "r", steps=30)
    held, released = [], []  # the script's requests, answered once the test says so

    def hold(route):
        if released:
            route.continue_()
        else:
            held.append(route)

    with serve(create_app(index)) as url:
        page.route("**/static/plotly.min.js", hold)
        page.goto(f"{url}/#run=r", wait_until="commit")
        page.wait_for_selector("#findings .finding")
        page.wait_for_function("() => document.getElementById('manifest').innerText.includes('received')")
        page.wait_for_function("() => document.getElementById('loader').innerText.includes('images')")
        assert "records" in page.inner_text("#run-meta") and "loss barely moves" in page.inner_text("#findings")
        assert held and page.evaluate("typeof window.Plotly") == "undefined"
        assert page.evaluate("document.getElementById('chart-metrics').data") is None  # no chart yet
        # nor a live stream: its records would wait in the page behind the script's compiling
        assert page.evaluate("window.__tt.es") is None
        released.append(True)
        for route in held:
            route.continue_()
        chart_has(page, "chart-metrics", 29)
        chart_has(page, "chart-grad-norm", 29)
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
        leave(page)
    assert page.problems == []


def test_long_evidence_stays_folded_and_times_read_as_dates(page):
    """A finding's evidence (here 300 steps per layer) is one line until opened, so the charts
    stay in the first screen; opened, each list is on one line. Unix times of the manifest and
    the health read as local date and time; one rank reads "rank 0". A long scaling statement
    of the patch metrics is said once, above their table, which stays within its panel."""
    loaded = time.time()
    index = Index(health=lambda: {"status": "ok", "mode": "serve", "loaded_at": loaded})
    # a loader's presence comes first and carries no step (Tap.log_loaders)
    index.add(rec("long-evidence", "loader_stats", "train_loader", {"present": True, "length": 272},
                  t=time.time() - 101))
    fill_run(index, "long-evidence", steps=40, t0=time.time() - 100)
    said = ("no scaling applied: raw predicted amplitude compared with target amplitude; "
            "least-squares optimal scale of the compared prediction: 1.80217")
    index.add(rec("long-evidence", "patch_metrics", "patch_metrics",
                  {"mae": 0.2647, "count": 32768, "scaling": said, "optimal_scale": 1.8022}, step=40))
    index.add(rec("long-evidence", "metrics", "val_loss", {"value": 0.5}, step=39, epoch=0))  # one epoch
    ri = index.get("long-evidence")
    ri.manifest = {**ri.manifest, "created": 1795717160.67, "updated": 1795717183.24,
                   "stream_marks": {"version": 1, "files": {"metrics.jsonl": {"bytes": 10, "tail_crc32": 7}}}}
    steps = list(range(0, 1200, 4))
    ri.findings = [{"rule": "frozen_parameters", "severity": "high", "hint": "weights never change",
                    "evidence": {"layers": {f"layer.{i}": {"captures": 300, "steps": steps} for i in range(8)}}}]
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=long-evidence")
        page.wait_for_selector("#findings details.evidence")
        chart_has(page, "chart-metrics", 39)
        box = page.evaluate("document.querySelector('#findings .finding').getBoundingClientRect().height")
        assert box < 120, box  # folded: title, hint and one line of evidence
        loss_top = page.evaluate("document.getElementById('chart-metrics').getBoundingClientRect().top")
        assert loss_top < 1000, loss_top  # the loss chart is in the first screen
        summary = page.inner_text("#findings details.evidence summary")
        assert summary.startswith('evidence { "layers": { "layer.0": { "captures": 300, "steps": [0, 4, 8')
        assert summary.endswith("...") and len(summary) <= len("evidence ") + 160
        page.click("#findings details.evidence summary")
        text = page.inner_text("#findings details.evidence pre")
        assert '"steps": [' + ", ".join(map(str, steps)) + "]" in text.replace("\n", "")
        assert text.count("\n") < 8 * 6  # a few lines per layer, not one per step
        manifest, health = page.inner_text("#manifest"), page.inner_text("#health")
        for shown in (manifest, health):
            assert "e+9" not in shown
        assert "stream_marks" not in manifest and "tail_crc32" not in manifest  # restart bookkeeping
        want = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)) for s in (1795717160.67, 1795717183.24)]
        assert f"created: {want[0]}" in manifest and f"updated: {want[1]}" in manifest
        assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loaded)) in health
        assert page.inner_text("#run-meta").endswith("records · rank 0")
        # a one-point series (a validation loss after one epoch) is drawn as a marker; 40 as a line
        modes = page.evaluate("Object.fromEntries(document.getElementById('chart-metrics').data"
                              ".map(t => [t.name, t.mode]))")
        assert modes == {"loss": "lines", "val_loss": "lines+markers"}
        points = page.evaluate("[...document.querySelectorAll('#chart-metrics .scatterlayer .trace')]"
                               ".map(t => t.querySelectorAll('path.point').length)")
        assert points == [0, 1]
        page.wait_for_selector("#patch table")
        assert page.inner_text("#loader-caption").startswith("first record of each field: step 0, epoch 0, rank 0")
        assert page.inner_text("#patch-scaling").count(said) == 1 and said not in page.inner_text("#patch")
        assert page.evaluate("""(() => { const t = document.querySelector('#patch table');
            return t.getBoundingClientRect().right <= t.parentElement.getBoundingClientRect().right + 1; })()""")
        assert "0.2647" in page.inner_text("#patch") and "1.8022" in page.inner_text("#patch")
        leave(page)
    assert page.problems == []


def test_hostile_names_render_as_text(page):
    index = Index()
    run = "xss-run"
    index.add(rec(run, "gradients", XSS, {"mean": 0.1, "std": 0.2, "norm": 0.3}, step=0))
    index.add(rec(run, "activations", XSS, {"mean": 0.1, "std": 0.2}, step=0))
    index.add(rec(run, "loader_stats", XSS, {"mean": 1.0, "note": XSS}, step=0))
    index.add(rec(run, "metrics", "loss", {"value": 1.0}, step=0))
    index.get(run).findings = [{"rule": XSS, "message": XSS, "evidence": {XSS: XSS}}]
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run={run}")
        chart_has(page, "chart-grad-norm", 0)
        page.wait_for_selector("#loader td")
        page.wait_for_selector("#findings .finding")
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        assert page.evaluate("document.querySelector('#loader td.name').textContent") == XSS
        assert XSS in page.inner_text("#findings")
        legend = page.evaluate("[...document.querySelectorAll('#chart-grad-norm .legendtext')].map(e => e.textContent)")
        assert legend == [XSS]
        page.wait_for_selector("#activations .gtitle")  # drawn after the charts above (may lag under load)
        titles = page.evaluate("[...document.querySelectorAll('#activations .gtitle')].map(e => e.textContent)")
        assert titles == ["activation: " + XSS]
        leave(page)
    assert page.problems == []


def test_live_record_from_a_sender_appears_in_the_chart(page, tmp_path):
    from client_hooks.sender import Sender

    with collector_process(str(tmp_path)) as info:
        sender = Sender(info["zmq"], "live-run", batch=16)
        try:
            for step in range(5):
                sender.send("metrics", "loss", {"value": 1.0 / (step + 1)}, step=step)
                sender.send("gradients", "enc.0", {"mean": 0.0, "std": 1e-3, "norm": 0.1}, step=step)
            sender.flush()
            page.goto(f"{info['http']}#run=live-run")
            chart_has(page, "chart-metrics", 4)
            page.wait_for_selector("#runs .dot.live")
            time.sleep(0.3)  # the page is now following the live stream
            t0 = time.monotonic()
            sender.send("metrics", "loss", {"value": 0.123}, step=777)
            sender.send("gradients", "enc.0", {"mean": 0.0, "std": 1e-3, "norm": 0.05}, step=777)
            chart_has(page, "chart-metrics", 777, timeout_ms=5_000)
            chart_has(page, "chart-grad-norm", 777, timeout_ms=5_000)
            assert time.monotonic() - t0 < 2.0
            y = page.evaluate("(() => { const t = document.getElementById('chart-metrics').data[0];"
                              " return t.y[Array.from(t.x).indexOf(777)]; })()")
            assert y == pytest.approx(0.123)
            # 6 points so far: drawn with markers; past 30 the live trace turns into a plain line
            assert page.evaluate("document.getElementById('chart-metrics').data[0].mode") == "lines+markers"
            for step in range(800, 830):
                sender.send("metrics", "loss", {"value": 0.1}, step=step)
            chart_has(page, "chart-metrics", 829, timeout_ms=5_000)
            page.wait_for_function("() => document.getElementById('chart-metrics').data[0].mode === 'lines'",
                                   timeout=5_000)
            leave(page)
        finally:
            sender.close()
    assert page.problems == []


def test_a_chart_out_of_view_waits_for_the_view_then_catches_up(browser, tmp_path):
    """Live, a chart out of view is not redrawn (a chart in view would wait behind it); its new
    points wait, thinned 2:1 past 600, and it catches up as soon as it scrolls into view."""
    from client_hooks.sender import Sender

    ctx = browser.new_context(viewport={"width": 1400, "height": 600})  # the loss chart in view
    page = ctx.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    with collector_process(str(tmp_path)) as info:
        sender = Sender(info["zmq"], "live-run", batch=64)
        try:
            send = lambda step: (sender.send("metrics", "loss", {"value": 1.0 / (step + 1)}, step=step),  # noqa: E731
                                 sender.send("gradients", "enc.0", {"mean": 0.0, "std": 1e-3, "norm": 0.1}, step=step))
            for step in range(5):
                send(step)
            sender.flush()
            page.goto(f"{info['http']}#run=live-run")
            chart_has(page, "chart-metrics", 4)
            chart_has(page, "chart-grad-norm", 4)  # drawn once, out of view
            assert not page.evaluate("document.getElementById('chart-grad-norm').__chart.visible")
            page.wait_for_selector("#runs .dot.live")
            time.sleep(0.3)
            for step in range(5, 1405):
                send(step)
            sender.flush()
            chart_has(page, "chart-metrics", 1404)
            time.sleep(2.5)  # longer than the 2 s after which the page redrew such a chart before
            last = "(() => { const x = document.getElementById('chart-grad-norm').data[0].x; return x.at(-1); })()"
            assert page.evaluate(last) == 4  # not redrawn out of view
            page.evaluate("document.getElementById('chart-grad-norm').scrollIntoView()")
            chart_has(page, "chart-grad-norm", 1404)
            xs = page.evaluate("Array.from(document.getElementById('chart-grad-norm').data[0].x)")
            # the whole history at a lower resolution: first and last step, points all through
            assert xs[0] == 0 and xs[-1] == 1404 and len(xs) <= 300 + 1 and xs == sorted(xs)
            assert max(b - a for a, b in zip(xs, xs[1:])) < 40
            page.goto("about:blank")
        finally:
            sender.close()
    ctx.close()
    assert problems == []


def test_each_rank_of_a_ddp_run_is_its_own_trace_live_too(page, tmp_path):
    """Two ranks of one run: rank 0's loss is "loss", rank 1's "loss · rank 1", loaded and
    live (they were one trace zigzagging between the ranks' values). An activation has one
    chart for both ranks, rank 1's statistics named "rank 1 · mean" in it (it had a chart
    of its own per rank)."""
    from tests.dashboard.conftest import two_ranks

    with collector_process(str(tmp_path)) as info:
        senders = two_ranks(info["zmq"])
        try:
            time.sleep(0.5)
            page.goto(f"{info['http']}#run=ddp")
            chart_has(page, "chart-metrics", 19)
            chart_has(page, "chart-grad-norm", 19)
            page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
            time.sleep(0.3)
            for r, s in enumerate(senders):
                s.send("metrics", "loss", {"value": 1.0 + r}, step=20)
                s.flush()
            page.wait_for_function("() => document.getElementById('chart-metrics').data"
                                   ".every(t => Array.from(t.x).includes(20))", timeout=5_000)
            traces = page.evaluate("document.getElementById('chart-metrics').data.map(t => "
                                   "[t.name, Array.from(t.x), Array.from(t.y)])")
            assert [t[0] for t in traces] == ["loss", "loss · rank 1"]
            for (_, xs, ys), value in zip(traces, (1.0, 2.0)):
                assert xs == list(range(21)) and ys == [value] * 21
            names = page.evaluate("document.getElementById('chart-grad-norm').data.map(t => t.name)")
            assert names == ["enc.0", "enc.0 · rank 1"]
            assert page.inner_text("#run-meta").endswith("ranks 0, 1")
            for r, s in enumerate(senders):  # live, into the same chart
                s.send("activations", "model_input", {"mean": float(r), "std": 1.0}, step=20)
                s.flush()
            page.locator("#activations .chart").first.scroll_into_view_if_needed()  # (drawn once in view)
            page.wait_for_function("() => [...document.querySelectorAll('#activations .chart')].some(d => "
                                   "d.data && d.data.length === 4 && d.data.every(t => Array.from(t.x).includes(20)))",
                                   timeout=5_000)
            acts = page.evaluate("[...document.querySelectorAll('#activations .chart')].map(d => "
                                 "[d.querySelector('.gtitle').textContent, d.data.map(t => "
                                 "[t.name, Array.from(t.x).length, Array.from(t.y).at(-1)])])")
            assert acts == [["activation: model_input", [["mean", 21, 0.0], ["std", 21, 1.0],
                                                         ["rank 1 · mean", 21, 1.0], ["rank 1 · std", 21, 1.0]]]]
            leave(page)
        finally:
            for s in senders:
                s.close()
    assert page.problems == []


def test_an_evaluations_activations_are_traces_of_their_own_in_the_chart_live_too(page, tmp_path):
    """record(always=True) in an evaluation loop sends records whose data say {"split": "val"}
    at the last training step: they are drawn as "val · mean" traces in the activation's chart,
    loaded and live (they were points of the training trace: 4 values at one step). A
    training value whose own name has " · " in it keeps a chart of its own."""
    from client_hooks.sender import Sender

    with collector_process(str(tmp_path)) as info:
        sender = Sender(info["zmq"], "evals", batch=16)
        try:
            for step in range(10):
                sender.send("activations", "model_input", {"mean": 0.0, "std": 1.0}, step=step)
            for _ in range(4):  # an evaluation after step 9: four batches
                sender.send("activations", "model_input", {"mean": 5.0, "std": 2.0, "split": "val"}, step=9)
            sender.send("activations", "model_input · scaled", {"mean": 1.0, "std": 1.0}, step=9)
            sender.flush()
            page.goto(f"{info['http']}#run=evals")
            page.wait_for_selector("#activations .chart")
            page.locator("#activations .chart").first.scroll_into_view_if_needed()  # (drawn once in view)
            page.wait_for_function("() => [...document.querySelectorAll('#activations .chart')].filter(d => "
                                   "d.data && d.data.length).length === 2", timeout=10_000)
            page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
            time.sleep(0.3)
            sender.send("activations", "model_input", {"mean": 0.5, "std": 1.0}, step=10)
            sender.send("activations", "model_input", {"mean": 6.0, "std": 2.0, "split": "val"}, step=10)
            sender.flush()
            page.wait_for_function("() => [...document.querySelectorAll('#activations .chart')].some(d => "
                                   "d.data && d.data.length === 4 && d.data.every(t => Array.from(t.x).includes(10)))",
                                   timeout=5_000)
            acts = page.evaluate("[...document.querySelectorAll('#activations .chart')].map(d => "
                                 "[d.querySelector('.gtitle').textContent, d.data.map(t => "
                                 "[t.name, Array.from(t.x), Array.from(t.y).at(-1)])])")
            modes = page.evaluate("[...document.querySelectorAll('#activations .chart')][0].data.map(t => t.mode)")
            assert modes == ["lines+markers", "lines+markers", "markers", "markers"]  # (val: a line zigzagged)
            assert acts == [["activation: model_input", [["mean", list(range(11)), 0.5], ["std", list(range(11)), 1.0],
                                                         ["val · mean", [9] * 4 + [10], 6.0],
                                                         ["val · std", [9] * 4 + [10], 2.0]]],
                            ["activation: model_input · scaled", [["mean", [9], 1.0], ["std", [9], 1.0]]]]
            leave(page)
        finally:
            sender.close()
    assert page.problems == []


def test_opening_another_run_while_a_chart_is_being_drawn_raises_no_page_error(page):
    """Opening another run purges the charts while a draw may be awaiting one of them (here
    plotly's first drawing of a new chart is held 400 ms); the draw stops there. It went on to
    extend the purged chart: "gd.data must be an array" (at Plotly.extendTraces <- flush <- draw)."""
    index = Index(health=lambda: {"status": "ok"})
    for run in ("run-a", "run-b"):
        fill_run(index, run, t0=time.time() - 20)
        index.get(run).closed_ranks.clear()  # both still sending
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=run-a")
        chart_has(page, "chart-metrics", 19)
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1 && "
                               "[...window.__tt.charts.values()].every(c => c.drawn && !c.dirty())")
        page.evaluate("""() => { const newPlot = Plotly.newPlot;
            Plotly.newPlot = async (...a) => { const r = await newPlot(...a);
              window.__holding = true; await new Promise(ok => setTimeout(ok, 400)); return r; }; }""")
        # a live record of a new activation: a new chart, drawn (held) and then extended
        index.add(rec("run-a", "activations", "late", stats(0.0), step=20))
        page.wait_for_function("() => window.__holding === true", timeout=5_000)
        page.evaluate("location.hash = 'run=run-b'")
        time.sleep(1.0)
        chart_has(page, "chart-metrics", 19)
        assert page.inner_text("#run-title") == "run-b"
        leave(page)
    assert page.problems == []


def test_switching_runs_keeps_the_gradient_legend_below_the_axis_and_the_page_its_width(browser):
    """The gradient charts' divs serve the next run: their legend below the plot kept its room
    only on the first run opened (the div had the height already, so the margin was not
    widened, and the legend covered the step axis). At 800 px the page does not overflow
    sideways (the manifest's table of 19 columns did), and the badge stays on one line."""
    index = Index(health=lambda: {"status": "ok"})
    for run in ("run-a", "run-b"):
        fill_run(index, run, layers=tuple(f"blocks.{i}.spectral_conv" for i in range(12)), t0=time.time() - 20)
        index.get(run).manifest = {"run": run, "ranks": {"0": {c: 1 for c in (
            "received", "written", "gaps", "duplicates", "dropped_by_sender", "rejected", "hello", "closed",
            "first_seq", "last_seq", "first_t", "last_t", "bytes", "records_metrics", "records_gradients",
            "records_activations", "records_loader_stats", "records_events")}}}
    ctx = browser.new_context(viewport={"width": 800, "height": 700})
    page = ctx.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    margin = "document.getElementById('chart-grad-norm')._fullLayout.margin.b"
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=run-a")
        chart_has(page, "chart-grad-norm", 19)
        page.wait_for_function(f"() => {margin} > 40", timeout=5_000)
        first = page.evaluate(margin)
        page.evaluate("location.hash = 'run=run-b'")
        page.wait_for_function("() => document.getElementById('run-title').textContent === 'run-b'")
        chart_has(page, "chart-grad-norm", 19)
        page.wait_for_function(f"() => Math.abs({margin} - {first}) < 3", timeout=5_000)  # (36 before)
        assert page.evaluate("document.documentElement.scrollWidth") <= 800
        badge = page.evaluate("(() => { const r = document.getElementById('run-live').getClientRects(); "
                              "return r.length; })()")
        assert badge == 1
        leave(page)
    ctx.close()
    assert problems == []


def test_a_live_runs_manifest_panel_follows_it_and_a_malformed_run_id_is_no_run(page):
    """The manifest panel was the one of the moment the page opened (a finished run of 304
    records said "received 6, closed false"); it follows the run's records and state. A run
    id the API refuses (422) shows "no run" as an unknown one does (it showed an empty run)."""
    index = Index(health=lambda: {"status": "ok"})
    fill_run(index, "r", t0=time.time() - 20)
    ri = index.get("r")
    ri.closed_ranks.clear()
    ri.manifest = {"run": "r", "ranks": {"0": {"received": 6, "closed": False}}}
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=r")
        chart_has(page, "chart-metrics", 19)
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
        assert "received" in page.inner_text("#manifest") and "false" in page.inner_text("#manifest")
        ri.manifest = {"run": "r", "ranks": {"0": {"received": 304, "closed": True}}}
        index.add(rec("r", "metrics", "loss", {"value": 0.5}, step=20))
        page.wait_for_function("() => document.getElementById('manifest').innerText.includes('304')", timeout=8_000)
        page.goto(f"{url}/#run=bad%20name!")
        page.wait_for_function("() => document.getElementById('empty').innerText.includes(\"no run 'bad name!' here\")",
                               timeout=5_000)
        assert not page.is_visible("#run")
        leave(page)
    assert [p for p in real_problems(page) if "422" not in p] == []


def real_problems(page) -> list[str]:
    """The page's problems less the browser's own line for each failed request (a 404 asked for
    on purpose, a refused connection while the server is down)."""
    return [p for p in page.problems if "Failed to load resource" not in p
            and "ERR_CONNECTION_REFUSED" not in p]


def test_an_unknown_run_in_the_url_says_so_and_lists_the_runs(page):
    index = Index(health=lambda: {"status": "ok"})
    fill_run(index, "run-a")
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=nope")
        page.wait_for_function("() => document.getElementById('empty').innerText.includes(\"no run 'nope' here\")",
                               timeout=5_000)
        assert page.is_visible("#empty") and not page.is_visible("#run")
        assert page.inner_text("#empty").splitlines()[0] == "no run 'nope' here. Runs here: run-a"
        assert page.get_attribute("#empty a", "href") == "#run=run-a"
        # the run starts sending: the page opens it
        fill_run(index, "nope", t0=time.time() - 20)
        chart_has(page, "chart-metrics", 19, timeout_ms=10_000)
        assert page.inner_text("#run-title") == "nope" and not page.is_visible("#empty")
        leave(page)
    assert real_problems(page) == []


def test_a_stopped_collector_is_shown_polled_less_and_picked_up_again(page):
    """The server goes away under an open page: a visible "collector unreachable" (not "live"
    for ever), requests backing off instead of a few a second; back, the page is as before."""
    index = Index(health=lambda: {"status": "ok"})
    fill_run(index, "r", t0=time.time() - 20)
    ri = index.get("r")
    ri.closed_ranks.clear()  # still sending
    index.add(rec("r", "metrics", "loss", {"value": 0.5}, step=20))
    port = free_port()
    asked = []
    page.on("request", lambda r: asked.append(time.monotonic()))
    with serve(create_app(index), port=port) as url:
        page.goto(f"{url}/#run=r")
        chart_has(page, "chart-metrics", 20)
        page.wait_for_function("() => document.getElementById('run-live').textContent === 'live'")
        assert not page.is_visible("#down")
        leave_url = url
    t_down = time.monotonic()
    page.wait_for_selector("#down", state="visible", timeout=5_000)
    assert page.inner_text("#run-live") == "collector unreachable"
    assert "stale" in page.get_attribute("#health", "class")  # its last counters, greyed (they read "ok")
    time.sleep(8)
    n = sum(1 for t in asked if t > t_down)
    assert n <= 8, n  # was: runs + health every 2 s and the live stream every second (~16)
    index.add(rec("r", "metrics", "loss", {"value": 0.3}, step=20))  # (still sending meanwhile)
    with serve(create_app(index), port=port):
        page.wait_for_selector("#down", state="hidden", timeout=20_000)
        assert "stale" not in (page.get_attribute("#health", "class") or "")
        page.wait_for_function("() => document.getElementById('run-live').textContent === 'live'", timeout=5_000)
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1", timeout=5_000)
        index.add(rec("r", "metrics", "loss", {"value": 0.25}, step=21))
        chart_has(page, "chart-metrics", 21, timeout_ms=5_000)
        leave(page)
    assert leave_url and real_problems(page) == []


def test_a_metrics_only_run_says_it_has_no_gradients_or_activations(page):
    index = Index(health=lambda: {"status": "ok"})
    for i in range(10):
        index.add(rec("loss-only", "metrics", "loss", {"value": 1.0 / (i + 1)}, step=i))
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=loss-only")
        chart_has(page, "chart-metrics", 9)
        page.wait_for_selector("#grad-none", state="visible", timeout=5_000)
        assert "No gradient records in this run" in page.inner_text("#grad-none")
        assert "No activation records in this run" in page.inner_text("#act-none")
        assert not page.is_visible("#grad-charts") and not page.is_visible("#act-charts")
        height = page.evaluate("document.getElementById('grad-section').getBoundingClientRect().height")
        assert height < 100, height
        # a gradient that comes later shows its charts
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
        index.add(rec("loss-only", "gradients", "enc.0", {"mean": 0.0, "std": 1e-3, "norm": 0.1}, step=10))
        chart_has(page, "chart-grad-norm", 10, timeout_ms=5_000)
        # the head's record count follows the live stream (it stayed at the count of the opening)
        page.wait_for_function("() => document.getElementById('run-meta').textContent.startsWith('11 records')",
                               timeout=5_000)
        assert page.is_visible("#grad-charts") and not page.is_visible("#grad-none")
        leave(page)
    assert page.problems == []


MARKS = """() => document.getElementById('chart-metrics').data.filter(t => t.yaxis === 'y2')
    .map(t => ({name: t.name, x: Array.from(t.x), mode: t.mode, symbol: t.marker.symbol}))"""


def test_a_nan_or_inf_loss_is_marked_along_the_charts_top_stored_and_live(page):
    """A non-finite loss is a gap in the line (JSON has no NaN or Inf); the page also marks
    its steps with an x along the top of the chart, on a hidden axis of its own that neither
    the loss's scale nor log mode moves. Before, the gap alone said so: at the end of a
    diverged run the line simply stopped."""
    index = Index(health=lambda: {"status": "ok"})
    values = [1.0, 0.9, math.nan, 0.8, math.inf, 0.7]
    for i, v in enumerate(values):
        index.add(rec("diverged", "metrics", "loss", {"value": v}, step=i))
        index.add(rec("diverged", "metrics", "val_loss", {"value": 1.0 - i / 10}, step=i))
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=diverged")
        chart_has(page, "chart-metrics", 5)
        page.wait_for_function(f"() => ({MARKS})().length === 1", timeout=5_000)
        assert page.evaluate(MARKS) == [{"name": "loss NaN/Inf", "x": [2, 4], "mode": "markers", "symbol": "x"}]
        loss = page.evaluate("document.getElementById('chart-metrics').data.find(t => t.name === 'loss').y")
        assert loss[2] is None and loss[4] is None and loss[5] == pytest.approx(0.7)  # the gap stays
        y2 = page.evaluate("document.getElementById('chart-metrics').layout.yaxis2")
        assert y2["overlaying"] == "y" and y2["visible"] is False and y2["range"] == [0, 1]
        # live: a NaN loss gets its mark, a finite one none; log mode leaves the marks where they are
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
        index.add(rec("diverged", "metrics", "loss", {"value": math.nan}, step=6))
        index.add(rec("diverged", "metrics", "loss", {"value": 0.5}, step=7))
        chart_has(page, "chart-metrics", 7, timeout_ms=5_000)
        page.wait_for_function(f"() => ({MARKS})()[0].x.includes(6)", timeout=5_000)
        assert page.evaluate(MARKS)[0]["x"] == [2, 4, 6]
        page.check("#loss-log")
        page.wait_for_function("() => document.getElementById('chart-metrics').layout.yaxis.type === 'log'")
        assert page.evaluate("document.getElementById('chart-metrics').layout.yaxis2.type") != "log"
        leave(page)
    assert page.problems == []


def test_the_runs_list_stops_saying_live_with_the_badge_not_a_poll_later(page):
    """The live stream says the run has finished: its entry in the runs list drops "· live"
    then, as the badge does (it waited for the next poll of the runs, up to 2 s later and
    longer while the collector was away). The polls are stopped here to show it."""
    index = Index(health=lambda: {"status": "ok"})
    index.add(rec("ending", "events", "hello", {"pid": 1, "host": "h", "world": 1}, seq=0))
    for i in range(3):
        index.add(rec("ending", "metrics", "loss", {"value": 1.0}, step=i, seq=1 + i))
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=ending")
        page.wait_for_selector("#runs .dot.live")
        assert page.inner_text("#runs li.selected").endswith("· live")
        page.wait_for_function("() => window.__tt.es && window.__tt.es.readyState === 1")
        page.evaluate("() => { clearTimeout(window.__tt.pollTimer); window.__tt.pollTimer = null; }")
        index.add(rec("ending", "events", "bye", {"records": 3}, seq=4))
        page.wait_for_function("() => document.getElementById('run-live').textContent === 'finished'",
                               timeout=5_000)
        page.wait_for_function("() => !document.querySelector('#runs .dot.live')", timeout=1_000)
        assert "live" not in page.inner_text("#runs li.selected")
        leave(page)
    assert page.problems == []


def test_long_layer_names_do_not_squeeze_the_gradient_charts(page):
    """Legends of layer paths sat right of the plot and took two thirds of a gradient chart."""
    index = Index(health=lambda: {"status": "ok"})
    names = [f"generator.unet.down_blocks.{j}.spectral_conv.weights1" for j in range(4)]
    for i in range(10):
        index.add(rec("long", "metrics", "loss", {"value": 1.0}, step=i))
        for j, name in enumerate(names):
            index.add(rec("long", "gradients", name, {"mean": 0.0, "std": 1e-3, "norm": 0.1 * (j + 1)}, step=i))
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=long")
        for cid in ("chart-grad-mean", "chart-grad-std", "chart-grad-norm"):
            chart_has(page, cid, 9)
        sizes = page.evaluate("['chart-grad-mean', 'chart-grad-std', 'chart-grad-norm'].map(id => {"
                              " const d = document.getElementById(id), s = d._fullLayout._size;"
                              " return [s.w / d.clientWidth, s.h]; })")
        # the plot keeps its width (the legend is below it, was 1/3 of the width) and its height
        assert all(w > 0.75 and h >= 220 for w, h in sizes), sizes
        legend = page.evaluate("[...document.querySelectorAll('#chart-grad-norm .legendtext')].map(e => e.textContent)")
        assert legend == [f"…{j}.spectral_conv.weights1" for j in range(4)]
        hover = page.evaluate("document.getElementById('chart-grad-norm').data.map(t => t.hovertemplate)")
        assert all(name in h for name, h in zip(names, hover))  # the whole name in the hover
        leave(page)
    assert page.problems == []


def test_the_badge_tells_a_killed_run_from_a_finished_one_and_a_loaded_run_is_shown_whole(page):
    """A run whose rank said hello and never bye, and that went quiet: the badge says "quiet,
    never closed" (it said "finished", as for a run that closed). A run whose stored records a
    restarted collector is still putting back (`loading`): the page says so, and opens the run
    afresh once they are in, showing the points from before the restart (it showed only the
    records since until reloaded)."""
    from collector.index import RunIndex

    index = Index(health=lambda: {"status": "ok"})
    index.add(rec("killed", "events", "hello", {"pid": 1, "host": "h", "world": 1}, seq=0))
    for i in range(5):
        index.add(rec("killed", "metrics", "loss", {"value": 1.0}, step=i, seq=1 + i))
    index.get("killed").arrived -= 100  # nothing for 100 s
    ri = index.run("restarted")
    ri.hold()
    ri.loading = {"bytes": 1000, "read": 0}
    for i in range(20, 25):  # taken in since the restart
        index.add(rec("restarted", "metrics", "loss", {"value": 0.5}, step=i, seq=i))
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=killed")
        page.wait_for_function("() => document.getElementById('run-live').textContent === 'quiet, never closed'",
                               timeout=5_000)
        assert "quiet" in page.get_attribute("#run-live", "class")
        page.goto(f"{url}/#run=restarted")
        chart_has(page, "chart-metrics", 24)
        assert "loading its stored records" in page.inner_text("#run-meta")
        stored = RunIndex("restarted")
        stored.add_stored([rec("restarted", "metrics", "loss", {"value": 1.0}, step=i, seq=i) for i in range(20)])
        ri.merge_stored(stored)
        ri.loading = None
        chart_has(page, "chart-metrics", 0, timeout_ms=8_000)  # the next look at the runs (every 2 s)
        xs = page.evaluate("Array.from(document.getElementById('chart-metrics').data[0].x)")
        assert xs == list(range(25))
        assert "loading" not in page.inner_text("#run-meta")
        leave(page)
    assert page.problems == []


def test_a_stored_run_open_in_the_page_is_followed_when_its_training_resumes(page, tmp_path):
    """collect's view lists a run stored under its root (from before a restart) and the page
    shows it; when its training sends again, the page moves from the stored copy (which gets
    no new record) to the live run, whole: stored and new points."""
    from client_hooks.sender import Sender
    from tests.dashboard.conftest import wait_for

    with collector_process(str(tmp_path)) as info:
        s = Sender(info["zmq"], "cut", batch=8)
        for step in range(10):
            s.send("metrics", "loss", {"value": 1.0 / (step + 1)}, step=step)
        s.flush()
        assert wait_for(lambda: (tmp_path / "cut" / "metrics.jsonl").exists()
                        and len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 10)
        s.close()
    os.remove(tmp_path / ".ready.json")  # (the next collector writes its own)
    with collector_process(str(tmp_path)) as info:
        page.goto(f"{info['http']}#run=cut")
        chart_has(page, "chart-metrics", 9)
        s = Sender(info["zmq"], "cut", batch=8)
        for step in range(10, 15):
            s.send("metrics", "loss", {"value": 0.05}, step=step)
        s.flush()
        chart_has(page, "chart-metrics", 14, timeout_ms=15_000)
        xs = page.evaluate("Array.from(document.getElementById('chart-metrics').data[0].x)")
        assert xs == list(range(15))
        s.close()
        leave(page)
    assert page.problems == []


def test_a_finding_the_diagnosis_explains_by_another_is_shown_under_its_cause(page):
    """A consequence (evidence consequence_of, collector.diagnosis.causes) is indented under
    its causes and names them; a cause is shown as before."""
    index = Index(health=lambda: {"status": "ok"})
    fill_run(index, "frozen", steps=10)
    index.get("frozen").findings = [
        {"rule": "frozen_parameters", "severity": "high", "hint": "lift.0 gets gradients but never changes",
         "evidence": {"count": 1}},
        {"rule": "loss_plateau", "severity": "high", "hint": "the loss is flat: likely a consequence of "
         "frozen_parameters", "evidence": {"consequence_of": ["frozen_parameters"]}}]
    with serve(create_app(index)) as url:
        page.goto(f"{url}/#run=frozen")
        page.wait_for_selector("#findings .finding.consequence")
        got = page.evaluate("[...document.querySelectorAll('#findings .finding')].map(f => "
                            "[f.classList.contains('consequence'), f.querySelector('.title').textContent, "
                            "(f.querySelector('.of') || {}).textContent || null, f.getBoundingClientRect().left])")
        assert [g[:3] for g in got] == [[False, "frozen_parameters", None],
                                        [True, "loss_plateau", "← frozen_parameters"]]
        assert got[1][3] > got[0][3]  # indented
        leave(page)
    assert page.problems == []
