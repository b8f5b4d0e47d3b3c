"""The page in a real browser (Debian's Chromium driven by Playwright): it loads a run, a
live record pushed through a real collector appears in a chart, a finding appears in the
panel, and a hostile layer name renders as text. Saves test-artifacts/dashboard.png."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from collector.index import Index
from dashboard.app import create_app
from tests.dashboard.conftest import REPO, XSS, collector_process, fill_run, rec, serve

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
        assert names == ["loss", "cmp · loss"]  # the overlay run, drawn dotted
        assert page.evaluate("document.getElementById('chart-grad-norm').layout.yaxis.type") == "log"
        # the collector's diagnosis adds a finding: the open page shows it without a reload
        index.get("after-fix").findings = index.get("after-fix").findings + [
            {"rule": "dead_gradients", "severity": "error", "message": "dec.3 gradient is zero"}]
        page.wait_for_function("() => document.getElementById('findings').innerText"
                               ".includes('dec.3 gradient is zero')", timeout=5_000)
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
    ri.manifest = {**ri.manifest, "created": 1795717160.67, "updated": 1795717183.24}
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
