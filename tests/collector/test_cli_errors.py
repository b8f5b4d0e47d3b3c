"""Command-line mistakes give one line, not a traceback; replay finds out quickly that no
collector listens, and reaches a CURVE-authenticated one with the keys a training uses."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.collector.test_collector import rec
from tests.procs import ROOT, CollectorProc, free_port, manifest, read_jsonl, wait_for


def _cli(*args, env=None, timeout=60, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "collector", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_line(r, cmd: str, says: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tensortap {cmd}: error: ") and says in lines[0], r.stderr


def _run_folder(tmp_path, n: int = 5):
    run = tmp_path / "stored" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_bytes(b"".join(rec(i) + b"\n" for i in range(n)))
    return run


def test_cli_mistakes_give_one_line(tmp_path):
    run = _run_folder(tmp_path)
    _one_line(_cli("replay", str(run), "--to", "nonsense"), "replay", "bad --to endpoint 'nonsense'")
    _one_line(_cli("replay", str(run), "--to", "tcp://127.0.0.1:1", "--run", ""), "replay",
              "bad run id ''")  # (it took a new id instead, without a word)
    _one_line(_cli("keys", str(tmp_path / "missing" / "dir" / "k")), "keys", "No such file or directory")
    assert _cli("keys", str(tmp_path / "k")).returncode == 0
    # a file where a folder goes, a folder where a file prefix goes, the folder above a root
    afile = run / "metrics.jsonl"
    _one_line(_cli("report", str(afile)), "report", "metrics.jsonl' is a file: give its run folder")
    _one_line(_cli("replay", str(afile), "--to", "tcp://127.0.0.1:1"), "replay", "is a file: give its run folder")
    _one_line(_cli("serve", str(afile)), "serve", "metrics.jsonl' is a file, not a folder of runs")
    _one_line(_cli("collect", "--out", str(afile)), "collect",
              "metrics.jsonl' is a file; the artifact root is a folder")
    _one_line(_cli("report", str(tmp_path)), "report", "holds no run; runs are one level down, in")
    _one_line(_cli("keys", str(tmp_path) + "/"), "keys", "is a folder: give a file name prefix in it")
    assert not (tmp_path / ".key").exists()
    _one_line(_cli("keys", "", cwd=tmp_path), "keys", "the prefix is empty")  # (it wrote ./.key, ./.pub)
    assert not (tmp_path / ".key").exists() and not (tmp_path / ".pub").exists()
    _one_line(_cli("collect", "--curve-secret", str(tmp_path / "k.key"), "--http", "off", "--out", str(tmp_path)),
              "collect", "--curve-secret and --allow-keys go together")
    bad = {"TENSORTAP_COLLECT_MAX_FRAME": "1MiB", "TENSORTAP_COLLECT_QUEUE_BYTES": "lots"}
    _one_line(_cli("collect", "--out", str(tmp_path), env=bad), "collect", "TENSORTAP_COLLECT_MAX_FRAME='1MiB'")
    _one_line(_cli("collect", "--max-frame", "4096", "--out", str(tmp_path), env=bad), "collect",
              "TENSORTAP_COLLECT_QUEUE_BYTES='lots'")
    r = _cli("report", str(run), env=bad)  # other subcommands do not read them
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for cmd in ("collect", "serve"):  # a token no Bearer header can match
        where = ["--out", str(tmp_path)] if cmd == "collect" else [str(tmp_path)]
        _one_line(_cli(cmd, *where, "--http", "0.0.0.0:0", "--token", " s3cret"), cmd,
                  "--token must be a non-empty word without spaces")


def test_keys_keeps_an_existing_pair_unless_forced(tmp_path):
    prefix = str(tmp_path / "srv")
    assert _cli("keys", prefix).returncode == 0
    before = (tmp_path / "srv.key").read_bytes()
    _one_line(_cli("keys", prefix), "keys", "already exists (pass --force to replace the pair)")
    assert (tmp_path / "srv.key").read_bytes() == before
    os.chmod(tmp_path / "srv.key", 0o644)  # a secret key someone made readable
    assert _cli("keys", prefix, "--force").returncode == 0
    assert (tmp_path / "srv.key").read_bytes() != before
    assert (tmp_path / "srv.key").stat().st_mode & 0o777 == 0o600  # the new one is not (it kept 0644)


def test_serve_or_collect_on_a_busy_port_is_one_line_naming_the_option(tmp_path):
    """The line names --http and its address (it said only "[Errno 98] Address already in
    use"); collect leaves no empty --out behind when it cannot start."""
    _run_folder(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line(_cli("serve", str(tmp_path / "stored"), "--http", f"127.0.0.1:{port}"), "serve",
                  f"web view failed to start: [Errno 98] --http 127.0.0.1:{port}: Address already in use")
        out = tmp_path / "new-out" / "a" / "b"  # every folder it made goes, not only the last
        (tmp_path / "kept").mkdir()
        for where in (out, tmp_path / "kept" / "run"):
            _one_line(_cli("collect", "--out", str(where), "--zmq", "tcp://127.0.0.1:0", "--http",
                           f"127.0.0.1:{port}"), "collect", f"--http 127.0.0.1:{port}: Address already in use")
        assert not (tmp_path / "new-out").exists()
        assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "run").exists()


def _serve(root, http: str, tmp_path, cwd=ROOT) -> tuple[subprocess.Popen, dict]:
    ready = str(tmp_path / f"ready-{time.monotonic_ns()}")
    p = subprocess.Popen([sys.executable, "-m", "collector", "serve", str(root), "--http", http,
                          "--ready-file", ready], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: os.path.exists(ready) or p.poll() is not None, 30) and p.poll() is None, \
        p.communicate()[1][-2000:]
    with open(ready) as f:
        return p, json.load(f)


def test_the_web_view_binds_any_loopback_address_without_a_token(tmp_path):
    """127.0.0.2 and [::1] are loopback for the command line's check and for the server alike."""
    _run_folder(tmp_path)
    for http, url in (("127.0.0.2:0", "http://127.0.0.2:"), ("[::1]:0", "http://[::1]:")):
        p, info = _serve(tmp_path / "stored", http, tmp_path)
        try:
            assert info["http"].startswith(url), info
            with urllib.request.urlopen(info["http"] + "api/health", timeout=5) as r:  # its Host header passes too
                assert r.status == 200
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
        assert p.returncode == 0 and b"Traceback" not in err, err


def test_a_run_folder_given_as_dot_is_the_run_it_is(tmp_path):
    """`report .` and `serve .` inside a run's folder: the run is named by the folder (report
    wrote "run": "." into findings.json; serve listed no run)."""
    run = _run_folder(tmp_path)
    r = _cli("report", ".", cwd=run)
    assert r.returncode == 0 and r.stdout.startswith("r1:"), (r.stdout, r.stderr)
    assert json.loads((run / "findings.json").read_text())["run"] == "r1"
    p, info = _serve(".", "127.0.0.1:0", tmp_path, cwd=run)
    try:
        with urllib.request.urlopen(info["http"] + "api/runs", timeout=5) as resp:
            assert [x["run"] for x in json.load(resp)] == ["r1"]
    finally:
        p.terminate()
        p.communicate(timeout=20)


def test_replay_to_no_collector_says_so_in_one_line_within_seconds(tmp_path):
    run = _run_folder(tmp_path)
    t0 = time.monotonic()
    r = _cli("replay", str(run), "--to", f"tcp://127.0.0.1:{free_port()}", "--max", "--speed", "-1")  # (unused)
    assert time.monotonic() - t0 < 15
    _one_line(r, "replay", "no collector at tcp://127.0.0.1:")


def test_replay_reaches_a_curve_collector_with_the_training_side_keys(tmp_path):
    run = _run_folder(tmp_path, 7)
    for name in ("srv", "cli"):
        assert _cli("keys", str(tmp_path / name)).returncode == 0
    (tmp_path / "allowed").write_bytes((tmp_path / "cli.pub").read_bytes())
    col = CollectorProc(str(tmp_path / "out"), extra=["--curve-secret", str(tmp_path / "srv.key"),
                                                      "--allow-keys", str(tmp_path / "allowed")])
    try:
        r = _cli("replay", str(run), "--to", col.endpoint, "--max", "--run", "copy", timeout=60)
        _one_line(r, "replay", "set TENSORTAP_CURVE_SERVER_KEY and TENSORTAP_CURVE_CLIENT_KEY")  # no keys
        for server_key, says in ((tmp_path / "nope.pub", "nope.pub': no such file"),
                                 (tmp_path / "srv.key", "srv.key' holds 2 lines: give the collector's public key"),
                                 ("abc", "3 characters where a public key (Z85) has 40")):
            env = {"TENSORTAP_CURVE_SERVER_KEY": str(server_key),
                   "TENSORTAP_CURVE_CLIENT_KEY": str(tmp_path / "cli.key")}
            r = _cli("replay", str(run), "--to", col.endpoint, "--max", "--run", "copy", env=env, timeout=60)
            _one_line(r, "replay", says)  # (a ZMQError traceback before)
        for speed in ("1e-300", "inf", "nan"):
            _one_line(_cli("replay", str(run), "--to", col.endpoint, "--speed", speed), "replay",
                      "--speed must be between 1e-6 and 1e6")  # (1e-300: an OverflowError traceback)
        env = {"TENSORTAP_CURVE_SERVER_KEY": str(tmp_path / "srv.pub"),
               "TENSORTAP_CURVE_CLIENT_KEY": str(tmp_path / "cli.key")}
        r = _cli("replay", str(run), "--to", col.endpoint, "--max", "--run", "copy", env=env, timeout=60)
        assert r.returncode == 0 and "7 records" in r.stdout and "0 dropped" in r.stdout, (r.stdout, r.stderr)
        assert wait_for(lambda: len(read_jsonl(tmp_path / "out" / "copy" / "metrics.jsonl")) == 7)
    finally:
        col.stop()
    assert manifest(tmp_path / "out" / "copy")["totals"]["gaps"] == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_the_zeromq_endpoint_may_be_ipv6_loopback_for_collect_replay_and_the_client(tmp_path):
    """tcp://[::1]:PORT, loopback like 127.0.0.1 (the command line's check said so), was
    "collector failed to start: No such device": ZeroMQ takes an IPv6 address only with its
    IPV6 option on. The client's sender and replay connect to one too."""
    from client_hooks.sender import Sender

    run = _run_folder(tmp_path, 6)
    col = CollectorProc(str(tmp_path / "out"), extra=["--zmq", "tcp://[::1]:0"])
    try:
        assert col.endpoint.startswith("tcp://[::1]:"), col.endpoint
        r = _cli("replay", str(run), "--to", col.endpoint, "--max", "--run", "copy6", timeout=60)
        assert r.returncode == 0 and "6 records" in r.stdout, (r.stdout, r.stderr)
        s = Sender(col.endpoint, "client6")
        for i in range(4):
            s.send("metrics", "loss", {"value": 1.0 / (i + 1)}, step=i)
        s.close()
        assert wait_for(lambda: len(read_jsonl(tmp_path / "out" / "copy6" / "metrics.jsonl")) == 6)
        assert wait_for(lambda: len(read_jsonl(tmp_path / "out" / "client6" / "metrics.jsonl")) == 4)
    finally:
        col.stop()


def test_a_page_left_open_does_not_make_the_stop_print_a_traceback(tmp_path):
    """An open dashboard holds the live stream (server-sent events): the collector ends it
    when it stops, instead of uvicorn cancelling it after its grace second with a traceback."""
    import threading

    import httpx
    import zmq

    col = CollectorProc(str(tmp_path / "out"), http=True, quiet=False)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(col.endpoint)
    push.send(rec(0, run="open"))
    assert wait_for(lambda: httpx.get(col.http + "api/runs").json(), 10)
    got = []

    def listen():
        with httpx.stream("GET", col.http + "api/runs/open/live", timeout=30) as r:
            for chunk in r.iter_bytes():
                got.append(chunk)

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert wait_for(lambda: got, 10)
    rc = col.stop()
    push.close(0)
    t.join(10)
    out = col.output()
    assert rc == 0 and not t.is_alive()
    assert "Traceback" not in out and "Exception in ASGI application" not in out and "ERROR" not in out, out


def test_every_collect_option_has_its_environment_variable_quiet_too(tmp_path):
    """README: every `collect` option can be set as TENSORTAP_COLLECT_<OPTION>; --quiet was not."""
    col = CollectorProc(str(tmp_path / "out"), quiet=False, env={"TENSORTAP_COLLECT_QUIET": "1"})
    assert col.stop() == 0
    assert col.output() == ""
    loud = CollectorProc(str(tmp_path / "out2"), quiet=False)
    assert loud.stop() == 0
    assert "tensortap collector: stopped after" in loud.output()


def test_the_quiet_variable_reads_words_for_off_as_off(monkeypatch):
    """TENSORTAP_COLLECT_QUIET=no (or false, off, 0, empty) leaves the collector talking; it
    silenced it (anything but 0 or empty counted as on)."""
    from collector.cli import build_parser

    for value, quiet in (("no", False), ("False", False), ("off", False), ("0", False), ("", False),
                         ("1", True), ("yes", True)):
        monkeypatch.setenv("TENSORTAP_COLLECT_QUIET", value)
        assert build_parser().parse_args(["collect"]).quiet is quiet, value
