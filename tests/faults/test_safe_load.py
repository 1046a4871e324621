"""Hostile checkpoints: DeepSpeed's own loader unpickles anything, so a checkpoint file that carries a pickled
object would run its code when a run resumes. pcrl must load every checkpoint file weights-only: a tag whose model-states file carries code (with a manifest
that matches, as whoever planted it would write) is refused with the file's name before the code runs, and
once that tag is deleted the run resumes from the previous, honest ZeRO-1 checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from runs import finish, launch_without_eval

pytestmark = pytest.mark.integration


class _WritesMarker:
    """Unpickling this calls exec: the marker file appears if anything loads it with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _plant(tag_dir: Path, marker: Path) -> Path:
    """Add a code-running object to the tag's model-states file and fix up the manifest to match."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["extra"] = _WritesMarker(marker)
    torch.save(state, path)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    manifest["files"][path.name] = {
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_checkpoint_with_pickled_code_is_refused(sample_shards: Path, tmp_path: Path) -> None:
    """Pins: resuming through DeepSpeed's pickle loader (the marker appears), a refusal that does not name the
    file or shows a traceback, and a weights-only loader too strict for DeepSpeed's own ZeRO states (the
    honest resume fails). The run stops rather than fall back by itself: a planted file means the folder
    was tampered with, which a person should look at."""
    common = [
        f"data.shards={sample_shards}",
        f"run.output_dir={tmp_path}",
        "run.name=safe",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "engine.zero_stage=1",
        "tracking.enabled=false",
        "tracking.image_every=0",
    ]
    run_dir = tmp_path / "safe"
    log = tmp_path / "safe.log"
    assert finish(launch_without_eval([*common, "train.max_steps=2"], log), log) == 0, log.read_text()[-4000:]

    marker = tmp_path / "marker"
    planted = _plant(run_dir / "checkpoints/step_00000002", marker)
    rc = finish(launch_without_eval([*common, "train.max_steps=3"], log), log)
    out = log.read_text()
    assert not marker.exists(), "the planted object's code ran"
    assert rc == 2, out[-4000:]
    assert f"pretrain: error: checkpoint file {planted} holds a pickled object" in out, out[-4000:]
    assert "Unsupported global" in out and "Traceback" not in out
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000002", "nothing was rewritten"

    # The way out the message gives: delete the tag; the relaunch resumes from step 1, whose honest ZeRO-1
    # files (model states and the optimizer partition) load weights-only.
    shutil.rmtree(planted.parent)
    log2 = tmp_path / "resume.log"
    assert finish(launch_without_eval([*common, "train.max_steps=2"], log2), log2) == 0, log2.read_text()[
        -4000:
    ]
    assert f"resuming {run_dir} from step 1" in log2.read_text()
    assert list((run_dir / "checkpoints/step_00000001").glob("*optim_states.pt"))
    assert not marker.exists()
