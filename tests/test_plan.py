"""``launch/plan.py`` and ``pcrl.plan``: estimates that scale as they should with volumes, steps and GPUs,
refusals that name the problem, the ``--json`` keys, and ``--calibrate`` on this CPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from pcrl.config import load_config
from pcrl.plan import DEVICES, estimate, summarize_records
from pcrl.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs/pretrain/base.yaml"
TINY = REPO / "configs/pretrain/tiny.yaml"
KEYS = {
    "storage_bytes",
    "ingest_core_hours",
    "train_samples",
    "train_gpu_hours",
    "train_wall_hours",
    "checkpoint_bytes",
    "assumptions",
}


@pytest.fixture(scope="module")
def plan_cli() -> ModuleType:
    """``launch/plan.py`` as a module, so its ``main`` runs in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("plan_cli", REPO / "launch/plan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = plan_cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def inputs_folder(root: Path, volume: Path, copies: int) -> Path:
    """A folder of ``copies`` copies of one real volume file, as a user's raw inputs."""
    root.mkdir()
    for i in range(copies):
        shutil.copy(volume, root / f"case{i:02d}.nrrd")
    return root


def test_figures_scale_with_volumes_steps_and_gpus(sample_shards: Path) -> None:
    data = summarize_records(read_manifest(sample_shards, split="all"), "sample shards")
    cfg = load_config(BASE, [])
    h100 = DEVICES["h100"]
    one = estimate(data, cfg, 4, device=h100)

    doubled = estimate(data.scaled(2), cfg, 4, device=h100)
    assert doubled["storage_bytes"]["total"] == 2 * one["storage_bytes"]["total"]
    assert doubled["ingest_core_hours"] == pytest.approx(2 * one["ingest_core_hours"])
    assert doubled["train_gpu_hours"] == pytest.approx(one["train_gpu_hours"])  # training is set by steps

    longer = estimate(data, load_config(BASE, [f"train.max_steps={2 * cfg.train.max_steps}"]), 4, device=h100)
    assert longer["train_samples"] == 2 * one["train_samples"]
    assert longer["train_gpu_hours"] == pytest.approx(2 * one["train_gpu_hours"])
    assert longer["train_wall_hours"] == pytest.approx(2 * one["train_wall_hours"])

    # The same global batch over twice the GPUs (half the accumulation): the same samples and GPU-hours
    # in half the wall time.
    accum = load_config(BASE, ["train.grad_accum_steps=2"])
    four = estimate(data, accum, 4, device=h100)
    eight = estimate(data, cfg, 8, device=h100)
    assert eight["train_samples"] == four["train_samples"]
    assert eight["train_gpu_hours"] == pytest.approx(four["train_gpu_hours"])
    assert eight["train_wall_hours"] == pytest.approx(four["train_wall_hours"] / 2)
    # The same config on twice the GPUs trains twice the samples per step (as launch/pretrain.py would).
    assert eight["train_samples"] == 2 * one["train_samples"]
    assert eight["train_wall_hours"] == pytest.approx(one["train_wall_hours"])

    # Checkpoints: AdamW keeps two moments where SGD keeps one; keep_checkpoints sets the kept set.
    adamw = estimate(
        data, load_config(BASE, ["optim.name=adamw", "train.keep_checkpoints=5"]), 4, device=h100
    )
    ck, ck_adamw = one["checkpoint_bytes"], adamw["checkpoint_bytes"]
    assert ck_adamw["one"] > ck["one"] and ck_adamw["kept"] == 5 * ck_adamw["one"]
    assert ck["kept"] == 3 * ck["one"]


def test_inputs_headers_extrapolate_and_json_keys(
    plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], sample_volumes: dict[str, Path], tmp_path: Path
) -> None:
    plans = []
    for copies in (2, 4):
        folder = inputs_folder(tmp_path / f"x{copies}", sample_volumes["brain1"], copies)
        status, out, err = run(
            plan_cli, capsys, "--inputs", str(folder), "--sample", "1", "--modality", "mr",
            "--config", str(BASE), "--gpus", "8", "--device", "h100", "--json",
        )  # fmt: skip
        assert status == 0, err
        plans.append(json.loads(out))
    small, large = plans
    assert small.keys() >= KEYS
    assert small["data"]["files_found"] == 2 and large["data"]["files_found"] == 4
    assert small["data"]["sampled"] == 1
    assert large["storage_bytes"]["total"] == pytest.approx(2 * small["storage_bytes"]["total"], rel=1e-6)
    assert large["ingest_core_hours"] == pytest.approx(2 * small["ingest_core_hours"])
    assert {"one", "kept"} <= small["checkpoint_bytes"].keys()
    for a in small["assumptions"]:
        assert a["measured"] and a["where"], a
    assert any("compression, mr" in a["what"] for a in small["assumptions"])

    status, out, _ = run(
        plan_cli, capsys, "--modality", "mr", "--volumes", "100000", "--config", str(BASE), "--gpus", "8",
        "--device", "h100", "--inputs", str(tmp_path / "x2"), "train.max_steps=1000",
    )  # fmt: skip
    assert status == 0
    assert "64,000 samples" in out  # the override after --inputs reached the config: 1000 steps x 64
    assert "100,000 MR" in out and "assumptions:" in out and "GPU-hours" in out


def test_shards_table_reads_the_manifest(
    plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], sample_shards: Path
) -> None:
    status, out, err = run(
        plan_cli, capsys, "--shards", str(sample_shards), "--config", str(TINY), "--gpus", "2", "--device", "H100",
        "--json",
    )  # fmt: skip
    assert status == 0, err
    plan = json.loads(out)
    records = read_manifest(sample_shards, split="all")
    assert plan["storage_bytes"]["total"] == sum(r.size for r in records)
    assert plan["data"]["volumes"] == {"ct": 2, "mr": 2}
    # tiny.yaml is not the measured size: the H100 rate is scaled by FLOPs per sample, and says so.
    assert any("FLOPs per sample" in a["what"] for a in plan["assumptions"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "0", "--device", "h100"], "--gpus: must be at least 1, got 0"),
        (["--gpus", "1", "--device", "tpu9"], "--device tpu9: unknown device; known: h100"),
        (["--gpus", "1"], "give either --device NAME (known: h100) or --calibrate"),
        (["--gpus", "1", "--device", "h100", "engine.precision=fp32", "engine.channels_last=true"],
         "no measurement of engine.precision=fp32 engine.channels_last=true; measured settings:"),
        (["--gpus", "1", "--device", "h100", "train.max_step=3"], "max_step"),
    ],
)  # fmt: skip
def test_refusals_name_the_problem(
    plan_cli: ModuleType,
    capsys: pytest.CaptureFixture[str],
    sample_shards: Path,
    argv: list[str],
    message: str,
) -> None:
    status, out, err = run(plan_cli, capsys, "--shards", str(sample_shards), "--config", str(BASE), *argv)
    assert status == 2
    assert out == ""
    assert err.startswith("plan: error: ") and message in err
    assert "Traceback" not in err


def test_refuses_empty_unreadable_dicom_and_missing_inputs(
    plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a volume\n")
    status, out, err = run(
        plan_cli, capsys, "--inputs", str(empty), "--config", str(BASE), "--gpus", "1", "--device", "h100"
    )
    assert status == 2 and out == ""
    assert f"--inputs {empty}: no volume files" in err and "(1 other files)" in err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nrrd").write_bytes(b"NRRD0004\nthis is no header\n")
    status, out, err = run(
        plan_cli, capsys, "--inputs", str(bad), "--config", str(BASE), "--gpus", "1", "--device", "h100"
    )
    assert status == 2 and out == ""
    assert "no sampled header could be read" in err and "broken.nrrd" in err

    dicom = tmp_path / "dicom"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"\0" * 128 + b"DICM")  # the DICOM magic: a series, not a volume file
    status, out, err = run(
        plan_cli, capsys, "--inputs", str(dicom), "--config", str(BASE), "--gpus", "1", "--device", "h100"
    )
    assert status == 2 and out == ""
    assert "1 DICOM files" in err and "--shards" in err

    status, _, err = run(
        plan_cli, capsys, "--inputs", str(tmp_path / "missing"), "--config", str(BASE), "--gpus", "1",
        "--device", "h100",
    )  # fmt: skip
    assert status == 2 and "missing does not exist" in err


def test_calibrate_on_this_cpu(
    plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], sample_shards: Path
) -> None:
    """One short calibration (tiny sizes: a few seconds of bench/train_step.py and two volumes sharded)."""
    status, out, err = run(
        plan_cli, capsys, "--shards", str(sample_shards), "--config", str(TINY), "--gpus", "1", "--calibrate",
        "--json",
    )  # fmt: skip
    assert status == 0, err
    plan = json.loads(out)
    assert plan["device"] == "this machine (--calibrate)"
    assert plan["train_samples_per_s_per_device"] > 0 and plan["train_gpu_hours"] > 0
    whats = {a["what"]: a for a in plan["assumptions"]}
    step = whats["training step on this machine, per device"]
    assert "bench/train_step.py" in step["where"] and step["value"] == plan["train_samples_per_s_per_device"]
    assert "this machine" in whats["ingest CPU time (data_prep.shard, one worker)"]["where"]
