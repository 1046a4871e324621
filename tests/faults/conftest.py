"""Fault-injection helpers: a real MLflow server that a test stops and restarts, and a launched run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server not yet started; whatever the test leaves running is stopped after it."""
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()
