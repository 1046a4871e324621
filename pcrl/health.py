"""Representation health: is the siamese objective learning, stalling or collapsing?

SimSiam-style objectives (no negatives, no momentum encoder) can collapse silently: every input maps to the
same feature vector, the cosine terms reach -1 and the loss looks excellent. Every ``eval.every`` steps,
:class:`HealthEval` runs the current weights on the fixed held-out pairs of global views that the
restoration evaluation uses, and reports per decoder scale ``l`` (0 = coarsest; ``C`` = its channels,
``N`` = the number of view pairs):

* ``health/scale<l>/std``: the standard deviation over the pairs of the L2-normalised target features
  ``z / |z|`` (view 1), averaged over channels — 0 when collapsed to one vector, about ``1/√C`` when the
  features spread over the sphere;
* ``health/scale<l>/rank``: the effective rank of the (N, C) target features of view 1 — the exponential of
  the entropy of their normalised singular values (1 when every feature lies on one line, at most
  ``min(N, C)``);
* ``health/scale<l>/paired_cos`` and ``health/scale<l>/unpaired_cos``: the mean cosine between the target
  features of the two views of the same pair, and between views of different pairs; their difference
  ``health/scale<l>/gap`` is what the siamese terms have taught the network to tell apart (0 at a random
  initialisation, and 0 again after a collapse, where every cosine is 1).

The console warns, naming the scale, when a scale crosses a collapse threshold (:data:`COLLAPSE_STD`,
:data:`COLLAPSE_RANK_FRACTION`), and once more when it recovers. The evaluator (:class:`pcrl.evaluate.HealthEval`)
runs the forwards of training: a private copy of the model in training mode, view 1 and view 2 of
``eval.batch_size`` pairs in separate forwards (each its own BatchNorm batch, as in a training step).

Example::

    z = torch.randn(64, 128)
    feature_std(z)       # ≈ 1/√128 = 0.088
    effective_rank(z)    # ≈ 55 (of at most 64)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COLLAPSE_RANK_FRACTION",
    "COLLAPSE_STD",
    "collapsed",
    "effective_rank",
    "feature_std",
    "pair_cosines",
    "scale_health",
]

COLLAPSE_STD = 0.25
"""A scale is collapsing when ``std·√C`` falls below this: a quarter of the spread of features that cover the
sphere evenly (1.0), and far from the 0 of a full collapse."""

COLLAPSE_RANK_FRACTION = 0.1
"""A scale is collapsing when its effective rank falls below this fraction of its largest possible value,
``min(N, C)``: the features crowd into a few directions (with 32 pairs, fewer than 3.2). Relative, so that a
small evaluation set (few pairs) cannot raise it by itself."""


def feature_std(z: Tensor) -> Tensor:
    """SimSiam's collapse indicator: the per-channel standard deviation over samples of ``z / |z|``, averaged.

    Args:
        z: (N, C) features, N >= 2.

    Returns:
        0-dim float32: 0 when all rows point the same way; about ``1/√C`` for isotropic features.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be (N, C) with N >= 2, got {tuple(z.shape)}")
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


def effective_rank(z: Tensor, eps: float = 1e-12) -> Tensor:
    """Effective rank of a set of features: ``exp(-Σ p_k log p_k)`` with ``p = σ / Σσ`` over the singular values
    σ of the (uncentred) (N, C) matrix.

    Returns:
        0-dim float32 in [1, min(N, C)]: 1 for features on one line through the origin (a collapse to one
        vector included), ``min(N, C)`` for equal singular values.
    """
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"z must be (N, C) with N >= 1, got {tuple(z.shape)}")
    s = torch.linalg.svdvals(z.double())
    if float(s.sum()) <= 0:
        return torch.tensor(1.0)
    p = s / s.sum() + eps
    return torch.exp(-(p * p.log()).sum()).float()


def pair_cosines(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cosine of paired rows ``(a_i, b_i)`` and of unpaired rows ``(a_i, b_j)``, i ≠ j.

    Args:
        a: (N, C) features of view 1.
        b: (N, C) features of view 2 of the same N pairs, N >= 2.

    Returns:
        ``(paired, unpaired)``, 0-dim float32 each.
    """
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(
            f"a and b must be the same (N, C) with N >= 2, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    cos = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T  # (N, N)
    n = cos.shape[0]
    paired = cos.diagonal().mean()
    unpaired = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
    return paired, unpaired


def scale_health(z1: Tensor, z2: Tensor) -> dict[str, float]:
    """The statistics of one scale (names without the ``health/scale<l>/`` prefix).

    Args:
        z1: (N, C) target features of view 1 of N pairs.
        z2: (N, C) target features of view 2 of the same pairs.
    """
    paired, unpaired = pair_cosines(z1, z2)
    return {
        "std": float(feature_std(z1)),
        "rank": float(effective_rank(z1)),
        "paired_cos": float(paired),
        "unpaired_cos": float(unpaired),
        "gap": float(paired - unpaired),
    }


def collapsed(stats: dict[str, float], channels: int, samples: int) -> str | None:
    """Why a scale's statistics (:func:`scale_health` of ``samples`` rows of ``channels`` features) count as a
    collapse, or None."""
    reasons = []
    if stats["std"] * math.sqrt(channels) < COLLAPSE_STD:
        reasons.append(
            f"feature std {stats['std']:.4f} < {COLLAPSE_STD}/√{channels} = {COLLAPSE_STD / math.sqrt(channels):.4f}"
        )
    limit = COLLAPSE_RANK_FRACTION * min(samples, channels)
    if stats["rank"] < limit:
        reasons.append(
            f"effective rank {stats['rank']:.2f} < {COLLAPSE_RANK_FRACTION:g}·min({samples}, {channels}) = {limit:.2f}"
        )
    return "; ".join(reasons) or None
