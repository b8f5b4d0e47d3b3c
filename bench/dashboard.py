"""Dashboard benchmark (not a timed test). Three figures, written as Markdown to stdout:

1. hook -> page latency at a steady 10k records/s: a Sender (the hooks' transport) pushes
   loss, per-layer gradients and activations into a real `tensortap collect` subprocess; the
   page (Debian's Chromium via Playwright) follows the run live and notes, for every record
   it draws, Date.now() minus the record's wire time t (stamped at send). Goal p99 <= 200 ms.
2. time for the page to show a run of 50 layers x 5,000 steps (every chart drawn), from
   navigation start, cold (first visit) and warm (plotly.min.js in the HTTP cache) in a
   context without a profile on disk; then in a browser with one, as a user's browser is,
   where Chromium also keeps the script's compiled code. Goal < 2 s. Also when the run's head
   (manifest, counts) shows, before the charts.
3. API series query on that run: one (kind, name, stat) of 5,000 points. Goal < 50 ms.

    .venv/bin/python bench/dashboard.py [--seconds 10] [--rate 10000] [--layers 20]
    .venv/bin/python bench/dashboard.py --live-only [--tree PATH]   # figure 1 only
    .venv/bin/python bench/dashboard.py --load-only [--tree PATH]   # figures 2 and 3 only

--tree PATH measures another checkout's collector and page (e.g. a `git archive` of an earlier
commit) with this script: run it alternately with and without to compare two trees.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

TREE = os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]) if "--tree" in sys.argv[:-1] else \
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TREE)  # the collector, the page and the test helpers come from TREE

import httpx  # noqa: E402

from collector.index import Index  # noqa: E402
from collector.wire import Record  # noqa: E402
from dashboard.app import create_app  # noqa: E402
from tests.dashboard.conftest import collector_process, serve  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def live_latency(browser, seconds: float, rate: int, layers: int, height: int) -> dict:
    from client_hooks.sender import Sender

    per_step = 1 + layers + 3  # loss, gradients, three activations
    with tempfile.TemporaryDirectory() as out, collector_process(out) as info:
        sender = Sender(info["zmq"], "live", batch=256, max_queue_bytes=256 << 20)
        sender.send("metrics", "loss", {"value": 1.0}, step=0)
        sender.flush()
        time.sleep(0.3)
        page = browser.new_page(viewport={"width": 1400, "height": height})
        page.goto(f"{info['http']}#run=live")
        page.wait_for_function("() => !!(window.__tt && window.__tt.es && window.__tt.es.readyState === 1)")
        step, sent, start = 1, 0, time.perf_counter()
        warm_until = start + 2.0  # the first 2 s are discarded (charts created, JIT warm-up)
        cleared = False
        while (now := time.perf_counter()) < start + seconds:
            if not cleared and now >= warm_until:
                page.evaluate("() => { window.__tt.latency.length = 0; }")
                cleared, sent_at_clear = True, sent
            due = int((now - start) * rate)
            while sent < due:
                sender.send("metrics", "loss", {"value": 1.0 / step}, step=step)
                for j in range(layers):
                    sender.send("gradients", f"layer.{j}", {"mean": 1e-4, "std": 1e-3, "norm": 0.1 / step,
                                                            "max_abs": 0.01, "nan": 0, "inf": 0}, step=step)
                for a in ("model_input", "generator_output", "x_combined"):
                    sender.send("activations", a, {"mean": 0.1, "std": 1.0, "min": -2.0, "max": 2.0}, step=step)
                sent += per_step
                step += 1
            time.sleep(0.005)
        sent_measured = sent - sent_at_clear
        time.sleep(1.0)  # let the last records arrive
        lat = page.evaluate("() => window.__tt.latency.slice()")
        page.goto("about:blank")
        page.close()
        dropped = sender.dropped
        sender.close()
    return {"rate": rate, "seconds": seconds - 2.0, "sent": sent_measured, "drawn": len(lat),
            "dropped": dropped, "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
            "max": max(lat), "layers": layers, "height": height}


def big_index(layers: int, steps: int) -> Index:
    index = Index(health=lambda: {"status": "ok"})
    t0 = time.time() - steps
    seq = 0
    for step in range(steps):
        t = t0 + step * 0.1
        recs = [("metrics", "loss", {"value": 1.0 / (step + 1)})]
        recs += [("gradients", f"layer.{j}", {"mean": 1e-4 * (j + 1), "std": 1e-3, "norm": 0.1 / (step + 1),
                                              "max_abs": 0.01, "nan": 0, "inf": 0}) for j in range(layers)]
        recs += [("activations", a, {"mean": 0.1, "std": 1.0, "min": -2.0, "max": 2.0})
                 for a in ("model_input", "generator_output", "x_combined")]
        for kind, name, data in recs:
            index.add(Record(v=1, run="big", rank=0, world=1, seq=seq, t=t, kind=kind, name=name,
                             step=step, data=data))
            seq += 1
    index.add(Record(v=1, run="big", rank=0, world=1, seq=seq, t=t0 + steps, kind="events", name="bye"))
    for step in range(10):  # a small run to switch from
        index.add(Record(v=1, run="small", rank=0, world=1, seq=step, t=t0 + step, kind="gradients",
                         name="layer.0", step=step, data={"mean": 0.0, "std": 1.0, "norm": 1.0}))
        index.add(Record(v=1, run="small", rank=0, world=1, seq=100 + step, t=t0 + step, kind="metrics",
                         name="loss", step=step, data={"value": 1.0}))
    return index


# every chart of the big run drawn: the loss, the three gradient charts (all layers), activations
DONE = ("([n]) => { const ids = ['chart-metrics', 'chart-grad-mean', 'chart-grad-std', 'chart-grad-norm'];"
        " return ids.every(id => { const d = document.getElementById(id); return d && d.data; })"
        " && document.getElementById('chart-grad-norm').data.length === n"
        " && document.querySelectorAll('#activations .main-svg').length >= 3; }")
VIEWPORT = {"width": 1400, "height": 1000}


HEAD_MARK = "() => performance.getEntriesByName('tensortap:head')[0]?.startTime ?? null"


def _loads(ctx, url: str, layers: int, n: int, heads: Optional[list] = None) -> list[float]:
    """ms of n full navigations to the big run, each in a new page of `ctx`; heads: gets, for
    each, when the run's head (manifest, counts) was shown, in ms from navigation start (the
    page's performance mark)."""
    times = []
    for _ in range(n):
        page = ctx.new_page()
        page.goto("about:blank")
        t0 = time.perf_counter()
        page.goto(f"{url}/#run=big", wait_until="commit")
        page.wait_for_function(DONE, arg=[layers], polling=10, timeout=60_000)
        times.append((time.perf_counter() - t0) * 1000)
        if heads is not None:
            heads.append(page.evaluate(HEAD_MARK))
        page.goto("about:blank")
        page.close()
    return times


def profile_loads(p, url: str, layers: int, repeats: int) -> list[float]:
    """Full navigations in a browser with a profile on disk, as a user's browser has: Chromium
    then keeps the compiled code of plotly.min.js once it has run it twice (the incognito-like
    contexts of `page_load` keep none): on this project's VM, DOMContentLoaded came at 1.1 s
    in the first two loads and at 0.15 s after. Returns every load's ms, the two warm-up
    loads first."""
    with tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=shutil.which("chromium"),
                                                   headless=True, args=ARGS, viewport=VIEWPORT)
        try:
            return _loads(ctx, url, layers, repeats + 2)
        finally:
            ctx.close()


def page_load(browser, url: str, layers: int, repeats: int) -> dict:
    ctx = browser.new_context(viewport=VIEWPORT)
    heads: list = []
    times = _loads(ctx, url, layers, repeats, heads)
    # switching to the run in a page that is already open (plotly.min.js already compiled)
    page = ctx.new_page()
    page.goto(f"{url}/#run=small")
    page.wait_for_function("() => { const d = document.getElementById('chart-metrics'); return d && d.data; }")
    switch = []
    for _ in range(repeats):
        for run in ("big", "small"):
            t0 = time.perf_counter()
            page.evaluate("(r) => { location.hash = 'run=' + r; }", run)
            page.wait_for_function(DONE if run == "big" else
                                   "() => document.getElementById('chart-grad-norm').data?.length === 1",
                                   arg=[layers] if run == "big" else None, polling=10, timeout=60_000)
            if run == "big":
                switch.append((time.perf_counter() - t0) * 1000)
    page.goto("about:blank")
    ctx.close()
    return {"cold": times[0], "warm": statistics.median(times[1:]) if len(times) > 1 else None,
            "all": times, "switch": statistics.median(switch), "switch_all": switch, "heads": heads}


def api_query(url: str, n: int = 100) -> dict:
    out = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        for label, path, params in [
            ("series (5,000 points)", "/api/runs/big/series",
             {"kind": "gradients", "name": "layer.25", "stat": "norm"}),
            ("kind/gradients as the page asks (every layer, 3 stats, <= 600 points each)",
             "/api/runs/big/kind/gradients", {"stat": ["mean", "std", "norm"], "points": 600}),
        ]:
            c.get(path, params=params).raise_for_status()
            ms = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.get(path, params=params)
                ms.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200
            out[label] = {"p50": pct(ms, 50), "p99": pct(ms, 99), "bytes": len(r.content)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=20, help="gradient layers in the live test")
    ap.add_argument("--big-layers", type=int, default=50)
    ap.add_argument("--big-steps", type=int, default=5_000)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--live-only", action="store_true", help="figure 1 only (the latency)")
    ap.add_argument("--load-only", action="store_true", help="figures 2 and 3 only (page load, API)")
    ap.add_argument("--tree", default=TREE, help="checkout whose collector and page are measured")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=ARGS)
        # 1000 px: the loss chart and the three gradient charts in view; 600 px: the loss only
        lives = [] if a.load_only else [live_latency(browser, a.seconds, a.rate, a.layers, h) for h in (1000, 600)]
        if a.live_only:
            browser.close()
            print(f"tree {TREE}; load average at end {os.getloadavg()[0]:.2f}")
            print_lives(lives)
            return
        t0 = time.perf_counter()
        index = big_index(a.big_layers, a.big_steps)
        fill_s = time.perf_counter() - t0
        with serve(create_app(index)) as url:
            load = page_load(browser, url, a.big_layers, a.repeats)
            profiled = profile_loads(p, url, a.big_layers, a.repeats)
            api = api_query(url)
        browser.close()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, no GPU; load average at end "
          f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}")
    print_lives(lives)
    warm = "none" if load["warm"] is None else f"{load['warm']:.0f} ms"  # --repeats 1: no warm load
    print(f"\n2. page shows {a.big_layers} layers x {a.big_steps} steps "
          f"({a.big_steps * (a.big_layers + 4)} records; index filled in {fill_s:.1f} s): cold "
          f"{load['cold']:.0f} ms, warm median {warm} (all: "
          f"{', '.join(f'{x:.0f}' for x in load['all'])}); switching to it in an open page: median "
          f"{load['switch']:.0f} ms (all: {', '.join(f'{x:.0f}' for x in load['switch_all'])}); "
          f"in a browser with a profile on disk (compiled code kept), after two loads: median "
          f"{statistics.median(profiled[2:]):.0f} ms (all: {', '.join(f'{x:.0f}' for x in profiled)})")
    heads = [h for h in load["heads"] if h is not None]
    if heads:  # a page from before the mark has none
        print(f"   the run's head (manifest, counts) shown, ms from navigation start: "
              f"{', '.join(f'{h:.0f}' for h in heads)}")
    for label, r in api.items():
        print(f"\n3. API {label}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['bytes']} bytes")


def print_lives(lives: list[dict]) -> None:
    for live in lives:
        print(f"\n1. hook -> page at {live['rate']} records/s ({live['layers']} gradient layers + loss + 3 "
              f"activations per step), 1400x{live['height']} viewport, {live['seconds']:.0f} s measured: "
              f"{live['sent']} sent, {live['drawn']} drawn in a visible chart, {live['dropped']} dropped "
              f"by the sender; latency ms p50 {live['p50']:.0f}, p95 {live['p95']:.0f}, "
              f"p99 {live['p99']:.0f}, max {live['max']:.0f}")


if __name__ == "__main__":
    main()
