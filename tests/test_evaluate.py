"""The periodic validation of pretraining (pcrl/evaluate.py): restoration PSNR on fixed held-out views,
logged with the step's metrics and handed to the reporter, on one and on two processes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from runs import TINY, common_overrides, read_records, run_deepspeed

from pcrl.config import ConfigError, load_config
from pcrl.distributed import free_port
from pcrl.evaluate import Evaluation, RestorationEval, eval_views, metric_mode, psnr
from pcrl.model import PCRLv2UNet


def _cfg(shards: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(
        TINY, [f"data.shards={shards}", "eval.volumes=2", "eval.pairs_per_volume=1", *overrides]
    )


def test_psnr_matches_hand_computed_values() -> None:
    """A constant error of 0.1 on [0, 1] images is an MSE of 0.01, i.e. exactly 20 dB; 0.01 gives 40 dB."""
    target = torch.rand(2, 1, 4, 4, 4)
    out = target.clone()
    out[0] += 0.1
    out[1] -= 0.01
    assert torch.allclose(psnr(out, target), torch.tensor([20.0, 40.0]), atol=1e-3)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(out, target[:1])


def test_eval_config_errors_name_the_key(sample_shards: Path) -> None:
    """Bad eval settings are refused before a run starts, naming the key and what is allowed."""
    with pytest.raises(ConfigError, match=r"eval\.batch_size"):
        _cfg(sample_shards, "eval.batch_size=1")
    with pytest.raises(ConfigError, match=r"eval\.metric.*val/psnr"):
        metric_mode("val/psnrr")
    assert metric_mode("val/psnr") == "max" and metric_mode("val/mse") == "min"
    with pytest.raises(ConfigError, match=r"eval\.metric"):
        Evaluation.from_config(_cfg(sample_shards, "eval.metric=loss/total"))


def test_eval_views_are_fixed_by_eval_seed_not_run_seed(
    sample_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trials of a sweep differ in run.seed, yet must be scored on the same views, or their numbers do
    not compare; eval.seed changes them. The sample shards hold no val split: the fallback is announced."""
    with caplog.at_level(logging.WARNING, logger="pcrl.evaluate"):
        views, targets, names = eval_views(_cfg(sample_shards))
    assert "not held out" in caplog.text
    assert views.shape == targets.shape == (4, 1, 32, 32, 16)  # 2 volumes x 1 pair x 2 global views
    assert len(names) == 2
    again, _, _ = eval_views(_cfg(sample_shards, "run.seed=7"))
    assert torch.equal(views, again)
    other, _, _ = eval_views(_cfg(sample_shards, "eval.seed=1"))
    assert not torch.equal(views, other)
    assert float(targets.min()) >= 0.0 and float(targets.max()) <= 1.0


def test_restoration_eval_leaves_the_training_model_and_rng_alone(sample_shards: Path) -> None:
    """Evaluating must not change what training does next: the training model keeps its mode and BatchNorm
    statistics, the global torch RNG is not advanced, and the same weights score the same."""
    cfg = _cfg(sample_shards, "eval.batch_size=3")  # 4 views: batches of 3 + 1 would break BatchNorm
    evaluator = RestorationEval.from_config(cfg)
    assert evaluator is not None and evaluator.batches == [(0, 4)]
    model = PCRLv2UNet(1, cfg.model.base_channels, cfg.model.depth, cfg.model.norm).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    first = evaluator(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(first) == {"val/psnr", "val/mse"}
    assert math.isfinite(first["val/psnr"]) and first["val/mse"] > 0
    assert evaluator(model) == first
    # PSNR is the mean of per-view PSNRs: at least the PSNR of the mean MSE would be (Jensen), so a bug
    # that averaged in the wrong place shows.
    assert first["val/psnr"] >= -10 * math.log10(first["val/mse"]) - 1e-4


def test_training_logs_validation_and_reports_it(sample_shards: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """train() evaluates at every eval.every step and at the last, in the step's one record, and the
    reporter (what Ray Tune gets) sees the same numbers; evaluation does not shift the training losses."""
    from pcrl.engine import train

    def one_process_env() -> None:
        for var, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))

    one_process_env()
    common = [
        f"run.output_dir={tmp_path}",
        "train.max_steps=5",
        "train.log_every=2",
        "tracking.image_every=0",
    ]
    reported: list[tuple[int, dict[str, float]]] = []
    cfg = _cfg(sample_shards, *common, "run.name=eval", "eval.every=3")
    train(cfg, reporter=lambda metrics, step: reported.append((step, dict(metrics))))
    records = read_records(tmp_path / "eval")
    assert [r["step"] for r in records] == [2, 3, 4, 5]
    assert [r["step"] for r in records if "val/psnr" in r] == [3, 5]
    # The health monitors of every decoder scale come with each evaluation (tiny: depth 4, 3 scales).
    for scale in range(3):
        assert [r["step"] for r in records if f"health/scale{scale}/gap" in r] == [3, 5]
    assert [s for s, _ in reported] == [2, 3, 4, 5]
    for (step, metrics), record in zip(reported, records, strict=True):
        assert metrics.get("val/psnr") == record.get("val/psnr"), step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pcrl").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [3, 5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "health/scale2/std")] == [3, 5]

    # The same process group serves the second run (conftest destroys it after the test).
    cfg = _cfg(sample_shards, *common, "run.name=plain", "eval.every=0")
    train(cfg)
    plain = {r["step"]: r for r in read_records(tmp_path / "plain")}
    assert sorted(plain) == [2, 4, 5]
    # Steps 2 and 5 are one-step windows in both runs (the evaluation at 3 closes a window early).
    for r in records:
        if r["step"] in (2, 5):
            assert r["loss/total"] == plain[r["step"]]["loss/total"], r["step"]
    assert not any("val/psnr" in r or "health/scale0/std" in r for r in plain.values())


def test_two_processes_evaluate_without_deadlock(sample_shards: Path, tmp_path: Path) -> None:
    """Under two gloo ranks rank 0 evaluates and broadcasts: the run finishes and logs val/psnr."""
    overrides = [*common_overrides(sample_shards, tmp_path, "two", 4), "eval.every=2", "eval.volumes=2"]
    proc = run_deepspeed(2, [*overrides, "eval.pairs_per_volume=1", "tracking.image_every=0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_records(tmp_path / "two")
    assert [r["step"] for r in records if "val/psnr" in r] == [2, 4]
    assert all(math.isfinite(r["val/psnr"]) for r in records if "val/psnr" in r)
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    # The console line of an evaluation step shows the value (rank 0 alone prints).
    shown = [line for line in (proc.stdout + proc.stderr).splitlines() if "val psnr" in line]
    assert len(shown) == 2 and "step 2/4" in shown[0] and "step 4/4" in shown[1], proc.stderr[-3000:]


def test_console_line_shows_validation_only_when_evaluated() -> None:
    """The console line of an evaluation step carries val/psnr (and the probe's accuracy); others do not."""
    from pcrl.progress import ConsoleProgress

    console = ConsoleProgress(10, enabled=False)
    plain = console.line(2, {"loss/total": 0.5, "optim/lr": 1e-3})
    assert "val psnr" not in plain and "probe" not in plain
    line = console.line(4, {"loss/total": 0.5, "val/psnr": 21.234, "probe/accuracy": 0.75})
    assert "val psnr 21.23 dB" in line and "probe acc 0.750" in line
