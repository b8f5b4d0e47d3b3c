"""Shared helpers: a real ZeroMQ PULL socket that stands in for the collector."""
from __future__ import annotations

import threading
import time

import msgspec
import pytest

from collector.wire import decode


class Pull:
    """Binds tcp://127.0.0.1:<free port>; a thread collects every decoded record."""

    def __init__(self):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            if self.sock.poll(50):  # as the collector reads it (a packed record expanded)
                recs, _ = decode(self.sock.recv())
                self.records.extend(msgspec.to_builtins(recs))

    def wait_for(self, pred, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.records):
                return True
            time.sleep(0.02)
        return False

    def find(self, kind, name=None):
        return [r for r in self.records if r["kind"] == kind and (name is None or r["name"] == name)]

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def pull(monkeypatch):
    """A PULL endpoint, with the gate on and TENSORTAP_ENDPOINT/RUN pointing the client at it."""
    p = Pull()
    monkeypatch.setenv("TENSORTAP", "1")
    monkeypatch.setenv("TENSORTAP_ENDPOINT", p.endpoint)
    monkeypatch.setenv("TENSORTAP_RUN", f"test-{int(time.time() * 1000)}")
    yield p
    from client_hooks import session

    for s in list(session._senders.values()):
        s.close()
    session._senders.clear()
    p.close()
