"""Online linear probe: frozen encoder features → logistic regression on a small labelled real set.

The probe answers "is the representation getting better?" while pretraining runs. Its set is fixed once
(:mod:`pcrl.tasks`; ``probe.task`` picks it):

* ``aal`` (the default when ``probe.cases`` holds the Colin27 data, ``python -m data_prep.labelled --task
  aal``): Colin27 T1 patches labelled with their AAL lobe (6 classes), trained on one hemisphere and scored on
  the other; Colin27 is not in the pretraining data;
* ``lesion``: lesion and background patches of the pyradiomics cases (``python -m data_prep.labelled``),
  leave-one-case-out; those cases are the demo's pretraining volumes.

At each evaluation step:

1. the encoder's weights are copied into a private :class:`pcrl.model.PCRLv2Encoder` (float32, eval mode, so
   the training model, its mode and its statistics are never touched);
2. each patch becomes one feature vector: the global average of every encoder stage, concatenated
   (2·base + 4·base + ... channels: coarse and fine features both count);
3. a standardised, L2-regularised logistic regression (scikit-learn) is fitted leave-one-case-out: for each
   case (a hemisphere for ``aal``), on the patches of all other cases, and scored on the held-out case's;
4. ``probe/accuracy`` and ``probe/auc`` are computed over all held-out predictions pooled (AUC one-vs-rest,
   macro-averaged over classes, for more than two classes).

Everything is seeded; the same weights give the same numbers. Running statistics of BatchNorm (eval mode)
are what the encoder ships with, so the probe scores the encoder as a downstream user gets it.

Example::

    probe = LinearProbe(probe_patches(".cache/labelled", (-1000, 1000), (32, 32, 16), per_class=16, seed=0))
    probe(model)  # {"probe/accuracy": 0.81, "probe/auc": 0.88}; model: PCRLv2UNet or PCRLv2Encoder
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pcrl.config import ConfigError
from pcrl.model import PCRLv2Encoder
from pcrl.tasks import Patches, aal_patches, lesion_patches, probe_task, read_aal, read_cases

if TYPE_CHECKING:
    from pcrl.config import PretrainConfig

__all__ = [
    "LinearProbe",
    "class_accuracy",
    "class_auc",
    "leave_one_case_out",
    "patch_features",
    "probe_patches",
]

logger = logging.getLogger(__name__)


def probe_patches(
    folder: str,
    ct_window: Sequence[float],
    size: Sequence[int],
    per_class: int,
    seed: int,
    names: Sequence[str] | None = None,
    task: str = "lesion",
) -> Patches:
    """The probe's fixed set of patches of ``size``: for ``task="lesion"``, ``per_class`` lesion and
    background patches from every case; for ``"aal"``, ``per_class`` patches per AAL lobe and hemisphere;
    ``"auto"`` is ``aal`` when ``folder`` holds its data, else ``lesion``.

    Raises:
        FileNotFoundError: no labelled cases (or no Colin27 data for ``aal``) in ``folder``.
        ValueError: fewer than two cases (leave-one-case-out needs two), or ``names`` with the AAL task.
    """
    if probe_task(folder, task) == "aal":
        if names:
            raise ValueError(f"names {list(names)} select lesion cases; the AAL task has none (task=lesion?)")
        return aal_patches(read_aal(folder), size, per_class, seed)
    cases = read_cases(folder, ct_window, names)
    if len(cases) < 2:
        raise ValueError(f"{folder}: the probe needs at least two labelled cases, got {len(cases)}")
    return Patches.cat([lesion_patches(c, size, per_class, seed, i) for i, c in enumerate(cases)])


@torch.no_grad()
def patch_features(encoder: PCRLv2Encoder, images: Tensor, batch_size: int = 16) -> Tensor:
    """Global-average-pooled features of every encoder stage, concatenated.

    Args:
        encoder: the encoder (used as it is: mode, dtype and device are its own).
        images: (N, 1, X, Y, Z) patches.
        batch_size: patches per forward.

    Returns:
        (N, sum of stage_channels) float32 on the CPU.
    """
    p = next(encoder.parameters())
    out = []
    for s in range(0, images.shape[0], batch_size):
        stages = encoder(images[s : s + batch_size].to(p.device, p.dtype))
        out.append(torch.cat([f.float().mean(dim=(2, 3, 4)) for f in stages], dim=1).cpu())
    return torch.cat(out)


def leave_one_case_out(
    features: Tensor, labels: Tensor, cases: Tensor, regularization: float = 1.0, seed: int = 0
) -> dict[str, float]:
    """Fit a logistic regression per held-out case on the other cases; score the pooled held-out predictions.

    Args:
        features: (N, D) float.
        labels: (N,) class indices 0..K-1 (K >= 2).
        cases: (N,) case index of each row; at least two distinct values.
        regularization: inverse L2 strength (scikit-learn's ``C``).
        seed: the solver's seed.

    Returns:
        ``{"probe/accuracy", "probe/auc"}``: accuracy of the most probable class; AUC of the positive class for
        K = 2, else one-vs-rest macro AUC (0.5 when the held-out labels hold one class only).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, g = features.double().numpy(), labels.numpy(), cases.numpy()
    k = max(2, int(y.max()) + 1)
    scores = np.full((len(y), k), 1.0 / k)  # a fold without two classes to learn from predicts chance
    for case in np.unique(g):
        train, test = g != case, g == case
        if len(np.unique(y[train])) < 2:
            continue
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(C=regularization, max_iter=2000, random_state=seed)
        )
        clf.fit(x[train], y[train])
        fold = np.zeros((int(test.sum()), k))  # classes missing from training get probability 0
        fold[:, clf.classes_] = clf.predict_proba(x[test])
        scores[test] = fold
    return {"probe/accuracy": class_accuracy(y, scores), "probe/auc": class_auc(y, scores)}


def class_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Accuracy of (N, K) class probabilities against (N,) labels (K = 2: positive when p1 >= 0.5)."""
    pred = (probs[:, 1] >= 0.5).astype(int) if probs.shape[1] == 2 else probs.argmax(1)
    return float(np.mean(pred == labels))


def class_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of (N, K) class probabilities: of the positive class for K = 2, else one-vs-rest macro over the
    classes present; 0.5 when ``labels`` hold one class only."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return 0.5
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    # One-vs-rest per class present (macro); scikit-learn's multi_class="ovr" needs every column present.
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))


def _encoder_like(model: nn.Module) -> PCRLv2Encoder:
    """A float32 :class:`PCRLv2Encoder` with ``model``'s architecture (a PCRLv2UNet or a PCRLv2Encoder)."""
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten; keep the caller's RNG as it was
        return PCRLv2Encoder(model.in_channels, model.base_channels, model.depth, "batch")  # type: ignore[arg-type]


class LinearProbe:
    """The online linear probe, an evaluator of :mod:`pcrl.evaluate` (``probe/accuracy``, ``probe/auc``).

    Args:
        patches: the fixed labelled set (from at least two cases).
        batch_size: patches per forward.
        regularization: inverse L2 strength of the logistic regression.
        seed: the solver's seed.
    """

    METRICS: ClassVar[dict[str, str]] = {"probe/accuracy": "max", "probe/auc": "max"}

    def __init__(
        self, patches: Patches, batch_size: int = 16, regularization: float = 1.0, seed: int = 0
    ) -> None:
        if len(torch.unique(patches.cases)) < 2:
            raise ValueError("the probe needs patches from at least two cases (leave-one-case-out)")
        self.patches = patches
        self.batch_size = batch_size
        self.regularization = regularization
        self.seed = seed
        self._encoder: PCRLv2Encoder | None = None

    @classmethod
    def from_config(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> LinearProbe | None:
        """The probe of ``cfg.probe``, or None when ``probe.cases`` is empty (the probe is off).

        Raises:
            ConfigError: the cases cannot be read or the patch size does not fit the U-Net (names the key).
        """
        pc = cfg.probe
        if not pc.cases:
            return None
        factor = 2 ** (cfg.model.depth - 1)
        if any(s % factor for s in pc.patch_size):
            raise ConfigError(
                f"probe.patch_size: {list(pc.patch_size)} must be divisible by {factor} (2^(model.depth-1))"
            )
        if pc.names and probe_task(pc.cases, pc.task) == "aal":
            raise ConfigError(
                f"probe.names: {list(pc.names)} selects lesion cases, but probe.task={pc.task} uses the AAL task "
                f"({pc.cases} holds the Colin27 data); set probe.task=lesion, or probe.names=[]"
            )
        try:
            patches = probe_patches(
                pc.cases, cfg.data.ct_window, pc.patch_size, pc.per_class, pc.seed, pc.names, pc.task
            )
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"probe.cases={pc.cases} (probe.task={pc.task}): {e}") from None
        logger.info(
            "linear probe (%s task) every %d steps on %d patches of %d cases",
            probe_task(pc.cases, pc.task),
            cfg.eval.every,
            len(patches),
            len(torch.unique(patches.cases)),
        )
        probe = cls(patches, regularization=pc.regularization, seed=pc.seed)
        probe.patches = Patches(patches.images.to(device), patches.labels, patches.masks, patches.cases)
        return probe

    def features(self, model: nn.Module) -> Tensor:
        """(N, D) features of the probe's patches under ``model``'s encoder weights (copied, eval mode)."""
        if self._encoder is None or self._encoder.base_channels != model.base_channels:
            self._encoder = _encoder_like(model).to(self.patches.images.device)
        own = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        self._encoder.load_state_dict(own)
        return patch_features(self._encoder.eval(), self.patches.images, self.batch_size)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Score ``model``'s encoder (a PCRLv2UNet or PCRLv2Encoder; any dtype or memory format)."""
        return leave_one_case_out(
            self.features(model), self.patches.labels, self.patches.cases, self.regularization, self.seed
        )
