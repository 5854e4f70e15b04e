"""Fixtures for the datasets tests; the loopback server lives in loopback.py and the dataset
file builders in builders.py."""
from __future__ import annotations

import threading

import pytest

from tests.datasets.loopback import FlakyServer


@pytest.fixture
def server():
    yield from _serve(FlakyServer())


@pytest.fixture
def server6():
    """The same server on the IPv6 loopback, [::1]."""
    try:
        srv = FlakyServer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    yield from _serve(srv)


def _serve(srv: FlakyServer):
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
