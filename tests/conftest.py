"""Shared fixtures: real sample volumes (fetched once into the ignored cache), their shards, seeding."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from runs import REPO, TINY, launcher_env

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
        # DeepSpeed keeps its clone of the world group in a module global; after the group is destroyed the
        # next in-process train() would broadcast over the dead clone ("Group ... is not registered").
        import deepspeed.utils.groups

        deepspeed.utils.groups._WORLD_GROUP = None


def _mapped_shm() -> set[str]:
    """Names of the /dev/shm files some live process has mapped."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            names |= {
                line.rsplit("/", 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line
            }
        except OSError:  # gone meanwhile
            continue
    return names


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_shm_workspaces() -> Iterator[None]:
    """Ranks the tests SIGKILL cannot remove their DeepSpeed all-reduce workspace (67 MB of RAM each, see
    ``pcrl.distributed.release_shm_workspace``): at the end of the session, those the session's runs left
    and no live process maps are removed."""
    from pcrl.distributed import shm_workspaces

    before = shm_workspaces()
    yield
    mapped = _mapped_shm()
    for path in shm_workspaces() - before:
        if path.name not in mapped:
            path.unlink(missing_ok=True)


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


@pytest.fixture(scope="session")
def labelled_cases(sample_volumes: dict[str, Path]) -> Path:
    """The pyradiomics images with their lesion masks as labelled cases (``python -m data_prep.labelled``),
    cached beside the samples. Returns the folder (with ``cases.json``)."""
    from data_prep.labelled import prepare_labelled

    folder = samples_dir().parent / "labelled"
    prepare_labelled(sample_volumes, folder)
    return folder


@pytest.fixture(scope="session")
def aal_cases(labelled_cases: Path) -> Path:
    """The Colin27 T1 with its AAL atlas (``python -m data_prep.labelled --task aal``) in the labelled folder:
    fetched once with ``apt-get download mricron-data`` (16 MB, no root) into the cache. Returns the folder
    (with ``aal.json``; the probe's ``auto`` task is then the AAL task)."""
    from data_prep.fetch import fetch_samples
    from data_prep.labelled import prepare_aal

    prepare_aal(fetch_samples(samples_dir(), sources=["colin27"]), labelled_cases)
    return labelled_cases


@pytest.fixture(scope="session")
def tiny_run(sample_shards: Path, labelled_cases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-step pretraining (``python launch/pretrain.py``, tiny config, one process) with a checkpoint
    after each step and the online linear probe at step 2. Returns the run folder."""
    out = tmp_path_factory.mktemp("tiny_run")
    overrides = [
        f"data.shards={sample_shards}", f"run.output_dir={out}", "run.name=tiny", "train.max_steps=2",
        "train.checkpoint_every=1", "train.log_every=1", "data.num_workers=0", "tracking.image_every=0",
        "eval.every=2", "eval.volumes=2", "eval.pairs_per_volume=1", f"probe.cases={labelled_cases}",
        "probe.task=lesion", "probe.names=[lung1,brain2,breast1]", "probe.per_class=3",
    ]  # fmt: skip
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(TINY)]
    proc = subprocess.run(
        [*cmd, *overrides], cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "tiny"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Slurm cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd n1 and n2 on 127.0.0.1),
    one per session; skipped without Slurm or root (a failure under CI). Its daemons are stopped by PID."""
    from slurm_cluster import SlurmCluster, require_slurm

    require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
