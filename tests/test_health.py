"""Representation health (pcrl/health.py and its evaluator): each statistic pinned on hand-made features, and
the collapse warning on a real model whose features at one scale are made constant."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from runs import TINY

from pcrl.config import load_config
from pcrl.evaluate import HealthEval
from pcrl.health import COLLAPSE_STD, collapsed, effective_rank, feature_std, pair_cosines, scale_health
from pcrl.model import PCRLv2UNet


def _orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def test_collapsed_features() -> None:
    """One vector repeated: no spread, rank 1, every cosine 1 (no gap), and flagged as a collapse."""
    z = torch.randn(1, 32).repeat(50, 1)
    assert float(feature_std(z)) == pytest.approx(0.0, abs=1e-6)
    assert float(effective_rank(z)) == pytest.approx(1.0, abs=1e-4)
    stats = scale_health(z, z * 3.0)
    assert stats["paired_cos"] == pytest.approx(1.0, abs=1e-5)
    assert stats["unpaired_cos"] == pytest.approx(1.0, abs=1e-5)
    assert stats["gap"] == pytest.approx(0.0, abs=1e-5)
    why = collapsed(stats, 32, 50)
    assert why is not None and "feature std" in why and "effective rank" in why
    # All-zero features (a dead scale) count as rank 1, not as NaN.
    assert float(effective_rank(torch.zeros(8, 4))) == 1.0


def test_isotropic_features() -> None:
    """Gaussian features cover the sphere: std ≈ 1/√C, effective rank close to C, no collapse flagged."""
    c = 64
    z = torch.randn(8192, c, generator=torch.Generator().manual_seed(0))
    assert float(feature_std(z)) == pytest.approx(1 / math.sqrt(c), rel=0.03)
    assert 0.95 * c < float(effective_rank(z)) <= c
    assert collapsed(scale_health(z, torch.randn(8192, c)), c, 8192) is None


def test_low_rank_features() -> None:
    """Features in a k-dimensional subspace with equal singular values have effective rank exactly k; k = 1
    is a collapse even though the rows still differ (they lie on one line)."""
    v = _orthonormal(16, 3, seed=1)  # (C, k) an orthonormal basis of the subspace
    u = _orthonormal(200, 3, seed=2)  # (N, k) orthonormal coefficients: singular values all 1
    z = (u @ v.T).float()
    assert float(effective_rank(z)) == pytest.approx(3.0, abs=1e-3)
    line = torch.linspace(-1, 1, 40)[:, None] * torch.randn(1, 16)
    assert float(effective_rank(line)) == pytest.approx(1.0, abs=1e-4)
    stats = scale_health(line, line)
    assert stats["std"] > COLLAPSE_STD / 4  # the rows point two ways (±), so the std alone would pass
    assert "effective rank" in collapsed(stats, 16, 40)  # type: ignore[operator]
    # Few samples bound the rank: 4 rows on a line are not flagged (the limit is 0.1·min(N, C) = 0.4).
    assert collapsed(scale_health(line[::10], line[::10]), 16, 4) is None


def test_pair_cosines_hand_computed() -> None:
    """Paired rows identical and unpaired rows orthogonal: paired 1, unpaired 0; swapped pairs: the other way."""
    a = torch.eye(3)
    paired, unpaired = pair_cosines(a, a.clone())
    assert float(paired) == pytest.approx(1.0) and float(unpaired) == pytest.approx(0.0)
    b = a[[1, 2, 0]]
    paired, unpaired = pair_cosines(a, b)
    # a_i·b_i = 0 for all i; of the 6 unpaired products, 3 are 1 (a_i = b_j for j = i - 1 mod 3).
    assert float(paired) == pytest.approx(0.0) and float(unpaired) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same"):
        pair_cosines(a, a[:2])


def test_health_eval_warns_naming_the_collapsed_scale(sample_shards: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """On held-out views of real volumes, every scale of a randomly initialised model is healthy; a model whose
    scale-1 target features are constant (BatchNorm1d weight 0) is flagged at that scale alone, once, and the
    training model is left as it was."""
    cfg = load_config(TINY, [f"data.shards={sample_shards}", "eval.volumes=3", "eval.pairs_per_volume=2"])
    health = HealthEval.from_config(cfg)
    assert health is not None and health.views.shape[:3] == (6, 2, 1)
    torch.manual_seed(0)
    model = PCRLv2UNet(1, cfg.model.base_channels, cfg.model.depth).train()
    with caplog.at_level(logging.WARNING, logger="pcrl.evaluate"):
        metrics = health(model)
    assert sorted(metrics) == sorted(
        f"health/scale{s}/{k}"
        for s in range(model.num_scales)
        for k in ("std", "rank", "paired_cos", "unpaired_cos", "gap")
    )
    assert all(math.isfinite(v) for v in metrics.values())
    assert not [r for r in caplog.records if "collapse" in r.message]

    with torch.no_grad():
        model.heads[1].target_norm.weight.zero_()
        model.heads[1].target_norm.bias.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pcrl.evaluate"):
        metrics = health(model)
        health(model)  # still collapsed: no second warning
    warnings = [r.getMessage() for r in caplog.records if "collapse" in r.getMessage()]
    assert len(warnings) == 1 and "decoder scale 1 " in warnings[0], warnings
    assert metrics["health/scale1/std"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["health/scale1/gap"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["health/scale0/std"] > 0.01
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
