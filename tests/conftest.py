"""Shared fixtures: real sample volumes (fetched once into the ignored cache), their shards, seeding."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# No usage reports from the services the tests start (MLflow, Ray): the tests talk to loopback only.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def samples_dir() -> Path:
    """``$PCRL_CACHE/samples`` (the Makefile sets it), else ``<repo>/.cache/samples``."""
    return Path(os.environ.get("PCRL_CACHE", REPO / ".cache")) / "samples"


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leftover_process_group() -> Iterator[None]:
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def sample_volumes() -> dict[str, Path]:
    """Real pyradiomics NRRDs, name → path: ``lung1``, ``lung2`` (CT), ``brain1``, ``brain2``, ``breast1``
    (MRI) and their ``*_label`` masks. Downloaded from the package index on first use, then cached."""
    from data_prep.fetch import fetch_samples

    return fetch_samples(samples_dir())


@pytest.fixture(scope="session")
def sample_shards(sample_volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five real images sharded at 1 mm into 4 MB shards (one volume per shard; breast1 is rejected as
    too small, so 4 volumes: 2 CT + 2 MRI, all in the train split). Returns the shard folder."""
    from data_prep.fetch import image_names
    from data_prep.shard import shard_volumes

    out = tmp_path_factory.mktemp("sample_shards")
    images = [sample_volumes[n] for n in image_names(sample_volumes)]
    shard_volumes(images, out, shard_size_mb=4, workers=1, progress=False, overwrite=True)
    return out
