"""The reconstruction panel: fixed views from real shards, every decoder scale drawn, deterministic PNGs,
radiological orientation, and a training model that is left exactly as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pcrl.config import ConfigError, PretrainConfig, load_config
from pcrl.figures import ReconstructionPanel, draw_panel, middle_planes, panel_views, restore
from pcrl.model import PCRLv2UNet

REPO = Path(__file__).resolve().parents[1]


def _cfg(shards: Path, *overrides: str) -> PretrainConfig:
    return load_config(REPO / "configs/pretrain/tiny.yaml", [f"data.shards={shards}", *overrides])


def _model(cfg: PretrainConfig, seed: int = 0) -> PCRLv2UNet:
    torch.manual_seed(seed)
    return PCRLv2UNet(1, cfg.model.base_channels, cfg.model.depth, cfg.model.norm)


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def tiny_cfg(sample_shards: Path) -> PretrainConfig:
    return _cfg(sample_shards)


@pytest.fixture(scope="module")
def views(tiny_cfg: PretrainConfig) -> list:
    return panel_views(tiny_cfg)


def test_panel_views_fall_back_to_train_and_show_both_modalities(
    views: list, tiny_cfg: PretrainConfig
) -> None:
    """The sample shards put every volume in train, so the default held-out split (val) is empty: the panel
    must fall back to the training volumes instead of failing, and with CT and MRI present show one of each
    (the first two manifest lines are both MRI)."""
    assert len(views) == tiny_cfg.tracking.image_volumes == 2
    assert {v.modality for v in views} == {"ct", "mr"}
    size = (1, *tiny_cfg.views.global_size)
    for v in views:
        assert tuple(v.view.shape) == size and tuple(v.target.shape) == size
        assert float(v.target.min()) >= 0.0 and float(v.target.max()) <= 1.0
        assert abs(float(v.view.mean())) < 1e-3  # z-normalised network input
        assert all(s > 0 for s in v.spacing)
    # fixed: the same config renders the same views
    again = panel_views(tiny_cfg)
    for a, b in zip(views, again, strict=True):
        assert a.key == b.key and torch.equal(a.view, b.view) and torch.equal(a.target, b.target)


@pytest.mark.parametrize("depth", [2, 4])
def test_draw_panel_has_a_row_per_scale_and_labels(views: list, tiny_cfg: PretrainConfig, depth: int) -> None:
    """Every decoder scale gets its row (target, input, S scales, output) × 3 planes per volume, with row
    labels, plane titles and the windowing named; a missing scale would silently hide a head's output."""
    model = PCRLv2UNet(1, 4, depth, "batch").train()
    inputs = torch.stack([v.view for v in views])
    reconstruction, scales = restore(model, inputs)
    assert len(scales) == depth - 1
    assert all(s.shape == reconstruction.shape == inputs.shape for s in scales)
    fig = draw_panel(views, reconstruction, scales, step=12, ct_window=(-1000, 1000))
    rows = 2 + (depth - 1) + 1
    assert len(fig.axes) == rows * 3 * len(views)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert len(labels) == rows
    assert (
        labels[0].startswith("target") and labels[1].startswith("input") and labels[-1].startswith("output")
    )
    assert "±3σ" in labels[1]
    assert [lab.split("\n")[0] for lab in labels[2:-1]] == [
        f"scale {i + 1} (1/{2 ** (depth - 2 - i)})" for i in range(depth - 1)
    ]
    texts = " ".join(t.get_text() for t in fig.texts)
    assert all(word in texts for word in ("axial", "coronal", "sagittal", "step 12", "radiological", "HU"))
    assert sum("MSE" in t.get_text() for ax in fig.axes for t in ax.texts) == (depth - 1 + 1) * len(views)


def test_panel_png_is_deterministic_and_leaves_the_training_model_alone(
    views: list, tiny_cfg: PretrainConfig, tmp_path: Path
) -> None:
    """Same weights, same picture (the views are fixed); and drawing must not touch the training model:
    its mode, its BatchNorm running statistics and its weights stay exactly as they were (the panel runs a
    private copy with batch statistics)."""
    model = _model(tiny_cfg).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel = ReconstructionPanel(views, _model(tiny_cfg, seed=1), tiny_cfg.data.ct_window)
    first = panel.save(model, 60, tmp_path / "a")
    second = panel.save(model, 60, tmp_path / "b")
    assert first == tmp_path / "a/recon_step_00000060.png" and second is not None
    a, b = _pixels(first), _pixels(second)
    assert a.ndim == 3 and a.shape[0] > 400 and a.shape[1] > 400
    assert np.array_equal(a, b)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # other weights, another picture
    other = panel.save(_model(tiny_cfg, seed=2), 60, tmp_path / "c")
    assert other is not None and not np.array_equal(_pixels(other), a)


def test_panel_save_failure_is_reported_and_turns_panels_off(
    views: list, tiny_cfg: PretrainConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A panel that cannot be drawn must not end a long run: save() logs the error, returns None and stops
    trying (here: weights of another architecture)."""
    panel = ReconstructionPanel(views, _model(tiny_cfg), tiny_cfg.data.ct_window)
    wrong = PCRLv2UNet(1, 4, 3, "batch")
    assert panel.save(wrong, 5, tmp_path) is None
    assert "could not draw the reconstruction panel at step 5" in caplog.text
    assert not panel.enabled and panel.save(_model(tiny_cfg), 6, tmp_path) is None
    assert not list(tmp_path.glob("*.png"))


def test_middle_planes_are_radiological() -> None:
    """RAS+ (x, y, z) arrays are shown with the patient's right on the left (axial, coronal), anterior up
    (axial) and on the left (sagittal), superior up (coronal, sagittal): pins the orientation docs/pretraining.md
    documents, so a transposed or mirrored panel cannot pass."""
    v = np.zeros((6, 8, 10), np.float32)
    v[5, :, :] += 1  # patient's right (+x)
    v[:, 7, :] += 2  # anterior (+y)
    v[:, :, 9] += 4  # superior (+z)
    axial, coronal, sagittal = middle_planes(v)
    assert axial.shape == (8, 6) and coronal.shape == (10, 6) and sagittal.shape == (10, 8)
    assert (axial[:, 0] % 2 == 1).all() and (axial[0, :] >= 2).all()  # right on the left, anterior up
    assert (coronal[:, 0] % 2 == 1).all() and (coronal[0, :] >= 4).all()  # right on the left, superior up
    assert (sagittal[:, 0] % 4 >= 2).all() and (sagittal[0, :] >= 4).all()  # anterior left, superior up


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("tracking.image_volumes=1", "BatchNorm needs two samples"),
        ("tracking.image_every=-1", ">= 0"),
        ("tracking.image_split=holdout", "train, val, test or all"),
    ],
)
def test_tracking_image_config_errors_name_the_key(override: str, phrase: str) -> None:
    """Bad panel settings stop the launch with the key and what is expected."""
    with pytest.raises(ConfigError, match=override.split("=")[0]) as e:
        load_config(None, [override])
    assert phrase in str(e.value)
