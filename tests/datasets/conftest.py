"""Fixtures for the datasets tests; the loopback server lives in loopback.py and the dataset
file builders in builders.py."""
from __future__ import annotations

import threading

import pytest

from tests.datasets.loopback import FlakyServer


@pytest.fixture
def server():
    srv = FlakyServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
