"""`tensortap` command line: collect | serve | replay | report | demo | keys.

Every option of `collect` can also come from a TENSORTAP_COLLECT_<OPTION> environment
variable (e.g. TENSORTAP_COLLECT_HTTP=127.0.0.1:9000). Bad input gives one line on stderr
and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Optional

from collector.security import is_loopback
from collector.text import plural


class UsageError(Exception):
    """Bad command-line input; the message is the one line the user sees."""


def check_zmq_endpoint(ep: str, option: str = "--zmq") -> str:
    m = re.fullmatch(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+|\*):(\d{1,5}|\*)", ep)
    if m:
        if m.group(2) != "*" and int(m.group(2)) > 65535:
            raise UsageError(f"bad {option} endpoint {ep!r}: port must be 0-65535")
        return ep
    if re.fullmatch(r"ipc://\S+", ep):
        return ep
    raise UsageError(f"bad {option} endpoint {ep!r}: expected tcp://HOST:PORT or ipc:///PATH")


def check_int(option: str, value, env: str) -> int:
    """An integer option; its default comes from an environment variable as text, read only
    by the command that uses it (a bad value there must not break every subcommand)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        src = f"{env}={value!r}" if os.environ.get(env) == value else f"{option} {value!r}"
        raise UsageError(f"{src} is not a whole number of bytes") from None


def check_http(addr: str) -> str:
    m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", addr)
    if not m or int(m.group(2)) > 65535:
        raise UsageError(f"bad --http address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8050")
    return addr


def check_token(token):
    """A --token as a browser can send it: not blank, no whitespace (a Bearer header's token
    is read stripped, so " s3cret" could never match)."""
    if token is not None and (not token or any(c.isspace() for c in token)):
        raise UsageError("--token must be a non-empty word without spaces")
    return token


def check_out(out: str) -> Optional[str]:
    """--out made if missing and written to once; the topmost folder this call made (for
    `unmake_out`), or None."""
    made, up = None, os.path.abspath(out)
    while not os.path.exists(up):
        made, parent = up, os.path.dirname(up)
        if parent == up:
            break
        up = parent
    if os.path.isfile(out):
        raise UsageError(f"--out {out!r} is a file; the artifact root is a folder")
    from collector.store import make_writable

    try:
        make_writable(out)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out!r}: {e.strerror or e}") from None
    return made


def unmake_out(out: str, made: Optional[str]) -> None:
    """Remove the empty folders `check_out` made for --out, up to `made` (nothing was written)."""
    if made is None:
        return
    d = os.path.abspath(out)
    while True:
        try:
            os.rmdir(d)
        except OSError:
            return
        if d == made:
            return
        d = os.path.dirname(d)


# the demo's faults (examples.grid_lines.models.INJECTS; the collector does not import torch)
DEMO_INJECTS = ("spectral-init", "loss-units", "amp-gain", "raw-input", "frozen-generator")


def _env(name: str, default):
    return os.environ.get("TENSORTAP_COLLECT_" + name.upper(), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensortap", description="tensortap: live tensor telemetry for PyTorch training")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="receive records over ZeroMQ, write JSONL, serve the dashboard")
    c.add_argument("--zmq", default=_env("zmq", "tcp://127.0.0.1:5557"),
                   help="PULL endpoint to bind (default %(default)s)")
    c.add_argument("--http", default=_env("http", "127.0.0.1:8050"),
                   help="dashboard HOST:PORT, or 'off' (default %(default)s)")
    c.add_argument("--out", default=_env("out", os.environ.get("TENSORTAP_OUT", ".artifacts/debug_fno_loss")),
                   help="artifact root, a folder per run (default %(default)s)")
    c.add_argument("--token", default=_env("token", None),
                   help="bearer token for the web view (required off loopback)")
    c.add_argument("--curve-secret", default=_env("curve_secret", None),
                   help="server key file from `tensortap keys` (required off loopback)")
    c.add_argument("--allow-keys", default=_env("allow_keys", None),
                   help="file of allowed client public keys, one per line")
    # integers checked by cmd_collect (check_int): an environment default is text here
    c.add_argument("--max-frame", default=_env("max_frame", str(1 << 20)),
                   help="largest frame in bytes; larger ones are rejected (default %(default)s)")
    c.add_argument("--queue-bytes", default=_env("queue_bytes", str(64 << 20)),
                   help="bytes waiting to be written at most (default %(default)s)")
    c.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    quiet = _env("quiet", "").strip().lower() not in ("", "0", "no", "false", "off")
    c.add_argument("--quiet", action="store_true", default=quiet,
                   help="print nothing: no start line, no summary at stop (TENSORTAP_COLLECT_QUIET=1)")
    # started by a training process (client_hooks.session), which prints the URL itself
    c.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    s = sub.add_parser("serve", help="serve the dashboard over stored runs (no ingest)")
    s.add_argument("root", help="artifact root (a folder of runs) or one run's folder")
    s.add_argument("--http", default="127.0.0.1:8050", help="dashboard HOST:PORT (default %(default)s)")
    s.add_argument("--token", default=None, help="bearer token for the web view (required off loopback)")
    s.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    r = sub.add_parser("replay", help="re-send a stored run into a live collector")
    r.add_argument("run_dir", help="a stored run's folder")
    r.add_argument("--to", required=True, help="collector endpoint, e.g. tcp://127.0.0.1:5557")
    r.add_argument("--speed", type=float, default=1.0, help="pacing factor (2 = twice as fast)")
    r.add_argument("--max", action="store_true", help="as fast as possible")
    r.add_argument("--run", default=None, help="run id of the copy (default: a new one)")
    rep = sub.add_parser("report", help="print the diagnosis of a stored run")
    rep.add_argument("run_dir", help="a stored run's folder; or a folder of runs: a line each")
    rep.add_argument("--json", action="store_true",
                     help="print the findings as JSON (for a folder of runs: each run's summary line as JSON)")
    d = sub.add_parser("demo", help="run the grid-lines FNO demo with telemetry on")
    d.add_argument("--architectures", default="fno", help="comma-separated, of fno and hybrid (U-FNO); "
                   "default %(default)s")
    d.add_argument("--inject", default=None, choices=DEMO_INJECTS, metavar="FAULT",
                   help="train with a fault for the diagnosis to find: " + ", ".join(DEMO_INJECTS))
    d.add_argument("--output-dir", default="outputs/debug_fno_loss", help="where the demo writes its "
                   "metrics.json (default %(default)s); the telemetry goes under TENSORTAP_OUT")
    k = sub.add_parser("keys", help="make a CURVE key pair for a remote endpoint")
    k.add_argument("prefix", help="writes PREFIX.key (secret) and PREFIX.pub (public)")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    return p


def cmd_collect(a) -> int:
    from collector.server import Collector, Config

    check_zmq_endpoint(a.zmq)
    http = None if a.http == "off" else check_http(a.http)
    zhost = a.zmq.split("://", 1)[1].rsplit(":", 1)[0] if a.zmq.startswith("tcp://") else "127.0.0.1"
    if not is_loopback(zhost) and not (a.curve_secret and a.allow_keys):
        raise UsageError(f"--zmq {a.zmq} is not loopback: it needs --curve-secret and --allow-keys "
                         "(see `tensortap keys`)")
    check_token(a.token)
    if http and not is_loopback(http.rsplit(":", 1)[0]) and not a.token:
        raise UsageError(f"--http {http} is not loopback: it needs --token")
    if bool(a.curve_secret) != bool(a.allow_keys):
        raise UsageError("--curve-secret and --allow-keys go together: the server's key file and the "
                         "file of client public keys it accepts (see `tensortap keys`)")
    a.max_frame = check_int("--max-frame", a.max_frame, "TENSORTAP_COLLECT_MAX_FRAME")
    a.queue_bytes = check_int("--queue-bytes", a.queue_bytes, "TENSORTAP_COLLECT_QUEUE_BYTES")
    if a.max_frame < 1024:
        raise UsageError("--max-frame must be at least 1024 bytes")
    if a.queue_bytes < 1:
        raise UsageError("--queue-bytes must be at least 1")
    made = check_out(a.out)
    cfg = Config(zmq=a.zmq, http=http, out=a.out, token=a.token, curve_secret=a.curve_secret,
                 allow_keys=a.allow_keys, max_frame=a.max_frame, queue_bytes=a.queue_bytes,
                 ready_file=a.ready_file, quiet=a.quiet, embedded=a.embedded)
    col = Collector(cfg)
    try:
        col.start()
    except Exception as e:  # e.g. address in use
        col.shutdown()
        unmake_out(a.out, made)  # (nothing was written: no empty --out left behind)
        raise UsageError(f"collector failed to start: {e}") from None
    col.serve_forever()
    return 0


def cmd_serve(a) -> int:
    from collector.load import load_root
    from collector.server import Collector, Config

    if not os.path.isdir(a.root):
        raise UsageError(f"{a.root!r} is a file, not a folder of runs" if os.path.isfile(a.root)
                         else f"no such directory: {a.root!r}")
    http = check_http(a.http)
    check_token(a.token)
    if not is_loopback(http.rsplit(":", 1)[0]) and not a.token:
        raise UsageError(f"--http {http} is not loopback: it needs --token")
    index = load_root(a.root)
    if not index.summaries():  # the folder above the runs' root, say: name where the runs are
        roots = _run_roots(a.root)
        if roots:
            print(f"tensortap serve: note: {a.root!r} holds no run; runs are one level down, in "
                  + ", ".join(f"{p!r} ({n})" for p, n in roots[:3]) + ": serve one of those", file=sys.stderr)
    col = Collector(Config(zmq=None, http=http, out=a.root, token=a.token, ready_file=a.ready_file),
                    index=index)
    try:
        col.start()
    except Exception as e:  # e.g. address in use
        col.shutdown()
        raise UsageError(f"web view failed to start: {e}") from None
    col.serve_forever()
    return 0


def _run_roots(path: str) -> list[tuple[str, int]]:
    """The subfolders of `path` that hold runs, with how many, most first."""
    from collector.load import is_run_dir

    out = []
    for e in os.scandir(path):
        if e.is_dir() and not is_run_dir(e.path):
            try:
                n = sum(1 for r in os.scandir(e.path) if is_run_dir(r.path))
            except OSError:  # a folder this user may not read (lost+found): not one of them
                continue
            if n:
                out.append((e.path, n))
    return sorted(out, key=lambda x: -x[1])


def check_run_folder(path: str) -> None:
    """A run folder (manifest.json or a stream file in it), else one line that says what the
    folder is: missing, an artifact root (its runs named), or no run at all."""
    from collector.load import is_run_dir

    if os.path.isfile(path):
        raise UsageError(f"{path!r} is a file: give its run folder (the one holding manifest.json and the "
                         "*.jsonl streams)")
    if not os.path.isdir(path):
        raise UsageError(f"no such run folder: {path!r}")
    if is_run_dir(path):
        return
    runs = sorted(((e.stat().st_mtime, e.name) for e in os.scandir(path) if is_run_dir(e.path)), reverse=True)
    if runs:
        newest = ", ".join(name for _, name in runs[:3])
        raise UsageError(f"{path!r} is a folder of {plural(len(runs), 'run')}, not a run: pass one of them "
                         f"(newest first: {newest})")
    roots = _run_roots(path)
    if roots:  # the folder above an artifact root
        raise UsageError(f"{path!r} holds no run; runs are one level down, in "
                         + ", ".join(f"{p!r} ({n})" for p, n in roots[:3]))
    raise UsageError(f"{path!r} holds no tensortap run (no manifest.json or *.jsonl stream files)")


def cmd_replay(a) -> int:
    check_zmq_endpoint(a.to, "--to")
    check_run_folder(a.run_dir)
    if not a.max and not 1e-6 <= a.speed <= 1e6:  # (--max: the speed is not used)
        raise UsageError(f"--speed must be between 1e-6 and 1e6 (2 = twice as fast), not {a.speed:g}; "
                         "--max sends as fast as the collector takes them")
    from collector.replay import replay_main

    return replay_main(a) or 0


def cmd_report(a) -> int:
    from collector.diagnosis.report import report_main, report_root
    from collector.load import is_run_dir

    if os.path.isdir(a.run_dir) and not is_run_dir(a.run_dir) and any(
            is_run_dir(e.path) for e in os.scandir(a.run_dir)):
        return report_root(a.run_dir, a.json)  # a folder of runs: a line each
    check_run_folder(a.run_dir)  # before findings.json is written into it
    return report_main(a) or 0


def cmd_demo(a) -> int:
    # the collector never imports torch: the demo runs in its own interpreter
    cmd = [sys.executable, "-m", "examples.grid_lines.compare", "--N", "64", "--gridsize", "1",
           "--output-dir", a.output_dir, "--architectures", a.architectures, "--nepochs", "1",
           "--torch-epochs", "1", "--torch-loss-mode", "mae"]
    if a.inject:
        cmd += ["--inject", a.inject]
    return subprocess.call(cmd, env={**os.environ, "DEBUG_FNO_LOSS": "1", "TENSORTAP_DEMO_PROG": "tensortap demo"})


def cmd_keys(a) -> int:
    from collector.security import write_keypair

    if not a.prefix.strip():
        raise UsageError("the prefix is empty: give a file name prefix, e.g. 'collector' (writes "
                         "collector.key and collector.pub)")
    if a.prefix.endswith(("/", os.sep)) or os.path.isdir(a.prefix):
        raise UsageError(f"{a.prefix!r} is a folder: give a file name prefix in it, e.g. "
                         f"{os.path.join(a.prefix, 'collector')!r} (writes .key and .pub)")
    try:
        pub = write_keypair(a.prefix, overwrite=a.force)
    except OSError as e:
        raise UsageError(f"cannot write {e.filename or a.prefix!r}: {e.strerror or e}") from None
    print(f"wrote {a.prefix}.key (secret, keep it) and {a.prefix}.pub: {pub}")
    return 0


COMMANDS = {"collect": cmd_collect, "serve": cmd_serve, "replay": cmd_replay,
            "report": cmd_report, "demo": cmd_demo, "keys": cmd_keys}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = COMMANDS[args.cmd](args)
        sys.stdout.flush()  # here, so that a reader gone away is caught below
        return rc
    except UsageError as e:
        print(f"tensortap {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tensortap report RUN | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
