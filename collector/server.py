"""The collector process, composition root: ZeroMQ ingest + writer + diagnosis + web view.

Shutdown (SIGINT/SIGTERM) runs in a fixed order: stop accepting (drain what the socket
already holds, close it), hand pending lines to the writer, let it drain, fsync and write
manifests, diagnose, stop the web server, print a line per run (unless quiet). An embedded
collector (Config.embedded) ignores SIGINT, stops when its training process is gone, and
first waits (EMBEDDED_CLOSE_WAIT_S) for the byes of ranks still sending.
"""
from __future__ import annotations

import gc
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from collector.index import Index
from collector.ingest import RCVHWM, Ingest
from collector.load import CollectIndex
from collector.text import LOST, plural, run_counts

DIAGNOSE_S = 5.0
# Live diagnosis re-reads a run's files: only for runs up to this size (the demo's are
# ~1 MB); larger ones get a note and `tensortap report RUN_DIR` on demand.
DIAGNOSE_MAX_BYTES = 32 << 20
SUMMARY_RUNS = 20  # runs the stop summary lists one by one
EMBEDDED_CLOSE_WAIT_S = 5.0  # (client_hooks.session waits a little longer for it to exit)


TOO_LARGE = {"rule": "not_diagnosed", "severity": "low", "evidence": {"max_bytes": DIAGNOSE_MAX_BYTES},
             "hint": "run too large for live diagnosis; run `tensortap report RUN_DIR`"}


def run_bytes(run_dir: str) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(run_dir) if e.name.endswith(".jsonl"))
    except OSError:
        return 0


@dataclass
class Config:
    zmq: Optional[str] = "tcp://127.0.0.1:5557"  # None: serve stored runs only (no ingest)
    http: Optional[str] = "127.0.0.1:8050"       # None: no web view
    out: str = ".artifacts/debug_fno_loss"
    token: Optional[str] = None                  # required for a non-loopback --http
    curve_secret: Optional[str] = None           # key file; required for a non-loopback --zmq
    allow_keys: Optional[str] = None             # file of allowed client public keys (Z85)
    max_frame: int = 1 << 20
    queue_bytes: int = 64 << 20
    ready_file: Optional[str] = None
    quiet: bool = False  # no start line, no summary at stop
    # started by a training process (client_hooks.session), its parent: no start line (that
    # process prints the URL); SIGINT ignored (a Ctrl-C meant for the training reaches the
    # whole process group; the training process stops it with SIGTERM once its records are
    # sent); stops by itself if that process is gone; asked to stop, waits (at most
    # EMBEDDED_CLOSE_WAIT_S) for every rank seen to close: rank 0's process may exit first
    embedded: bool = False


class Collector:
    def __init__(self, cfg: Config, index: Optional[Index] = None) -> None:
        self.cfg = cfg
        if index is None:
            # collect: its live runs, and the runs stored under its root listed beside them
            # (read when opened); with no ingest, an empty index unless one is given (serve)
            index = CollectIndex(cfg.out) if cfg.zmq else Index()
        self.index = index
        self.ingest: Optional[Ingest] = None
        self.threads: dict[str, threading.Thread] = {}
        self.stop = threading.Event()
        self.http_url: Optional[str] = None
        self.zmq_endpoint: Optional[str] = None
        self._changed: set[str] = set()
        self._diagnosed: dict[str, tuple[float, float]] = {}  # run -> (last start, seconds)
        self._http_server = None
        self._hurry = False  # a second stop signal: no more waiting for open ranks
        self._parent = os.getppid() if cfg.embedded else None  # (read first: it may die meanwhile)

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        from collector import faults

        faults.install()  # no-op unless a TENSORTAP_FAULT_* variable is set (tests)
        # The ingest path allocates ~10 objects a record and the index keeps many alive:
        # with the default thresholds the cyclic GC rescans them every few hundred records
        # (measured: batched ingest 4.7 -> 2.5 us a record). Objects from start-up are frozen.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if self.cfg.zmq:
            self.ingest = Ingest(self.cfg.out, self.index, max_frame=self.cfg.max_frame,
                                 queue_bytes=self.cfg.queue_bytes,
                                 on_run_changed=lambda run: self._changed.add(run))  # the current set
            self.index.health = self.ingest.health
            self._bind_zmq()
            self._spawn("tensortap-ingest", self._ingest_loop)
            self._writer_done = threading.Event()
            self._spawn("tensortap-writer", lambda: self.ingest.write_loop(self._writer_done))
            self._spawn("tensortap-diagnose", self._diagnose_loop)
        if self.cfg.http:
            self._start_http()
        self._announce()

    def _spawn(self, name: str, fn) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self.threads[name] = t

    def _bind_zmq(self) -> None:
        import zmq

        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        # frames a little over the limit are still received (and counted as rejected);
        # far larger ones make ZeroMQ drop the connection before they use memory
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_frame + 4096)
        sock.setsockopt(zmq.LINGER, 0)
        if self.cfg.curve_secret:
            from collector.security import enable_curve
            self.auth = enable_curve(self.ctx, sock, self.cfg.curve_secret, self.cfg.allow_keys)
        endpoint = self.cfg.zmq
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"  # a free port
        self.sock = sock
        if "://[" in endpoint:  # an IPv6 address ([::1]): ZeroMQ takes it only with IPV6 on
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(endpoint)
        self.zmq_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _start_http(self) -> None:
        import uvicorn

        from dashboard.app import create_app

        from collector.security import is_loopback

        host, port = self.cfg.http.rsplit(":", 1)
        addr = host.strip("[]")  # [::1]:8050 names the address ::1
        app = self._app = create_app(self.index, token=self.cfg.token, loopback_only=is_loopback(host))
        lsock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((addr, int(port)))
        except OSError as e:
            lsock.close()
            raise OSError(e.errno, f"--http {self.cfg.http}: {e.strerror or e}") from None
        bound_port = lsock.getsockname()[1]
        self.http_url = f"http://{f'[{addr}]' if ':' in addr else addr}:{bound_port}/"
        # an open page holds a server-sent-events stream: give it 1 s, not forever, at shutdown
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self._http_server = uvicorn.Server(config)
        self._spawn("tensortap-http", lambda: self._http_server.run(sockets=[lsock]))
        deadline = time.monotonic() + 15
        while not self._http_server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def _announce(self) -> None:
        if self.cfg.ready_file:
            tmp = self.cfg.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"zmq": self.zmq_endpoint, "http": self.http_url, "pid": os.getpid(),
                           "out": os.path.abspath(self.cfg.out)}, f)
            os.replace(tmp, self.cfg.ready_file)
        if not self.cfg.quiet and not self.cfg.embedded:
            parts = [f"zmq {self.zmq_endpoint}" if self.zmq_endpoint else "no ingest",
                     f"dashboard {self._shown_url()}" if self.http_url else "no web view",
                     f"out {os.path.abspath(self.cfg.out)}"]
            print("tensortap collector: " + " | ".join(parts), file=sys.stderr, flush=True)

    def _shown_url(self) -> str:
        """The dashboard's URL as a user opens it: a wildcard address (0.0.0.0, ::) named by
        this host's name, and the token asked for (not printed: the line may go to a log)."""
        url, notes = self.http_url or "", []
        host = url.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]")
        if host in ("0.0.0.0", "::"):
            url = url.replace(f"[{host}]" if ":" in host else host, socket.gethostname(), 1)
            notes.append("on every interface")
        if self.cfg.token:
            notes.append("open it with ?token=<your --token>")
        return url + (f" ({'; '.join(notes)})" if notes else "")

    # -- threads --------------------------------------------------------------------------
    def _ingest_loop(self) -> None:
        import zmq

        ing, sock = self.ingest, self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        recv, again = sock.recv, zmq.Again

        def frame(data: bytes) -> None:
            try:
                ing.frame(data)
            except Exception as e:  # a bug must cost one frame, never the collector
                try:
                    ing.reject(data, f"internal error: {e!r}")
                except Exception:  # (reject never raises; this is the last guard)
                    ing.rejected += 1

        while not self.stop.is_set():
            if poller.poll(50):
                for _ in range(4096):
                    try:
                        data = recv(zmq.NOBLOCK)
                    except again:
                        break
                    frame(data)
            ing.handoff_if_due()
        # stop accepting: take what the socket already holds, then close it
        while True:
            try:
                frame(recv(zmq.NOBLOCK))
            except again:
                break
        sock.close(linger=0)
        ing.handoff()

    def _diagnose_loop(self) -> None:
        while not self.stop.wait(DIAGNOSE_S):
            self.diagnose()

    def diagnose(self, runs=None) -> None:
        """Re-run the rules on runs that changed; findings.json + the index. Never raises.

        Live (runs=None), a run is diagnosed again only after DIAGNOSE_S and at least 20x
        its last diagnosis took: re-reading a growing run must not take a core from the
        training next to it. At shutdown (runs given) every run is diagnosed once more."""
        final = runs is not None
        changed, self._changed = (set(runs) if final else self._changed), set()
        try:
            from collector.diagnosis import write_findings
        except ImportError:
            return
        now = time.monotonic()
        for run in changed:
            last_t, took = self._diagnosed.get(run, (-1e9, 0.0))
            if not final and now - last_t < max(DIAGNOSE_S, 20 * took):
                self._changed.add(run)  # not yet: next round
                continue
            run_dir = os.path.join(self.cfg.out, run)
            if run_bytes(run_dir) > DIAGNOSE_MAX_BYTES:
                self.index.run(run).findings = [TOO_LARGE]
                continue
            t0 = time.monotonic()
            try:
                findings = write_findings(run_dir)
                self.index.run(run).findings = findings
            except Exception as e:  # a rule bug must not take the collector down
                print(f"tensortap collector: diagnosis of {run} failed: {e!r}", file=sys.stderr)
            self._diagnosed[run] = (t0, time.monotonic() - t0)

    # -- stop -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.stop.set()
        if self.ingest is not None:
            self.ingest.closing.set()  # loaders of stored records (collector.load.load_stored) stop
        threads = self.threads
        if "tensortap-ingest" in threads:
            threads["tensortap-ingest"].join(5)
            self._writer_done.set()
            threads["tensortap-writer"].join(30)
            self.ingest.sync()
            self.diagnose(list(self.ingest.runs))
            self.ingest.close_files()
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        if getattr(self, "ctx", None) is not None:
            self.ctx.destroy(linger=0)  # closes whatever a failed start left open
        if self._http_server is not None:
            self._app.state.closing.set()  # open pages' live streams end, not cancelled with a traceback
            self._http_server.should_exit = True
            if "tensortap-http" in threads:
                threads["tensortap-http"].join(5)

    def _await_open_ranks(self) -> None:
        """Embedded: until every (run, rank) that said hello has said bye, at most
        EMBEDDED_CLOSE_WAIT_S (or until a second signal), still taking records in."""
        ing = self.ingest
        if ing is None or not self.cfg.embedded:
            return
        deadline = time.monotonic() + EMBEDDED_CLOSE_WAIT_S
        while not self._hurry and time.monotonic() < deadline and any(
                rf.unclosed() for rf in list(ing.runs.values())):
            time.sleep(0.05)

    def summary(self, max_runs: int = SUMMARY_RUNS) -> list[str]:
        """What this collector took in, a line per run (after shutdown): written, lost
        (sequence gaps, records the sender dropped, failed writes), duplicates, rejected
        frames, findings. Runs with loss or findings first, then the newest."""
        ing = self.ingest
        if ing is None:
            return []
        started = time.time() - ing.started
        out = os.path.abspath(self.cfg.out)
        runs = []
        for run, rf in list(ing.runs.items()):
            totals = rf.manifest()["totals"]
            findings = [f for f in (self.index.run(run).findings or []) if f.get("rule") != TOO_LARGE["rule"]]
            unclosed = rf.unclosed()
            bad = any(totals.get(k) for k, _ in LOST) or findings or unclosed
            runs.append((run, run_counts(totals, unclosed, rf.rejected, len(findings)), findings, bad))
        runs.sort(key=lambda r: (not r[3], -ing.runs[r[0]].created))
        # the runs this collector took records of (others stored under the root are not counted)
        lines = [f"tensortap collector: stopped after {_duration(started)}; "
                 f"{plural(len(runs), 'run')} received, under {out}"]
        width = max((len(r[0]) for r in runs[:max_runs]), default=0)
        for run, counts, findings, _ in runs[:max_runs]:
            tail = f"  -> tensortap report {shlex.quote(os.path.join(out, run))}" if findings else ""
            lines.append(f"  {run:<{width}}  {counts}{tail}")
        if len(runs) > max_runs:
            lines.append(f"  ... and {len(runs) - max_runs} more (each run's manifest.json has its counts)")
        if ing.rejected_no_run:
            lines.append(f"  {plural(ing.rejected_no_run, 'frame')} rejected that named no usable run: "
                         f"{os.path.join(out, '_rejected.jsonl')}")
        return lines

    def serve_forever(self) -> None:
        """Block until SIGINT/SIGTERM, then shut down in order."""
        asked = threading.Event()

        def _on_signal(signum, _frame):
            if asked.is_set():  # a second signal: no more waiting
                self._hurry = True
            asked.set()

        parent = self._parent
        old = {s: signal.signal(s, signal.SIG_IGN if s == signal.SIGINT and parent else _on_signal)
               for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not asked.wait(0.2) and not self.stop.is_set():
                if parent and os.getppid() != parent:  # killed (OOM, SIGKILL): finish its files
                    break
            self._await_open_ranks()
        finally:
            self.shutdown()
            for s, h in old.items():
                signal.signal(s, h)
        if not self.cfg.quiet and self.ingest is not None:
            try:
                print("\n".join(self.summary()), file=sys.stderr, flush=True)
            except Exception as e:  # a summary must not turn a clean stop into a failure
                print(f"tensortap collector: stopped (no summary: {e!r})", file=sys.stderr)


def _duration(seconds: float) -> str:
    """1.2 s, 3m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"
