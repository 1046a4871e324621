"""A disk that fills up while checkpointing, for real: the run folder lives on a size-limited tmpfs mounted
by the test (as root; the test is skipped where the mount is refused). The run must stop with a non-zero
status and a message naming the checkpoint path, leave the previous checkpoint intact and ``latest`` on it,
and a relaunch (on a disk with room) must resume from that checkpoint and finish."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from runs import finish, launch_without_eval

from pcrl import exit_status
from pcrl.checkpoint import verify_checkpoint

pytestmark = pytest.mark.integration

DISK_MB = 22  # room for two checkpoints of the tiny model (8.7 MB each) and not a third


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({mount.stderr.strip()}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    sample_shards: Path, small_disk: Path, tmp_path: Path
) -> None:
    """Pins: a traceback instead of a message, a half-written checkpoint that `latest` names, the previous
    checkpoint deleted or damaged by the failed save, and a run folder that cannot be resumed afterwards."""
    common = [
        f"data.shards={sample_shards}",
        "run.name=full",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
        "tracking.enabled=false",
        "tracking.image_every=0",
    ]
    log = tmp_path / "full.log"
    rc = finish(launch_without_eval([*common, f"run.output_dir={small_disk}", "train.max_steps=8"], log), log)
    out = log.read_text()
    run_dir = small_disk / "full"
    ckpt = run_dir / "checkpoints"
    assert rc == exit_status.CHECKPOINT_WRITE, out[-4000:]
    assert f"pretrain: stopped: could not write checkpoint {ckpt / 'step_00000006'}" in out, out[-4000:]
    assert f"the previous checkpoint {ckpt / 'step_00000004'} is intact" in out
    assert "Traceback" not in out
    assert (ckpt / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]
    assert verify_checkpoint(ckpt / "step_00000004") is None
    assert not list(ckpt.glob("**/*.tmp")), "no temporary files are left behind"

    # Usable: the same run folder, moved to a disk with room, resumes from step 4 and finishes.
    moved = tmp_path / "roomy"
    shutil.copytree(run_dir, moved / "full")
    log2 = tmp_path / "resume.log"
    rc = finish(launch_without_eval([*common, f"run.output_dir={moved}", "train.max_steps=6"], log2), log2)
    assert rc == 0, log2.read_text()[-4000:]
    assert f"resuming {moved / 'full'} from step 4" in log2.read_text()
    assert (moved / "full/checkpoints/latest").read_text() == "step_00000006"
