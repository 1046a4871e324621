"""The PCRLv2 objective (docs/method.md §3) and the training task that the DeepSpeed engine wraps.

Per step, with S decoder stages and L local views per sample::

    l*            ~ U{0..S-1}                              (one draw, shared by the global and multi-scale terms)
    global      = D_{l*}(view 1, view 2)
    local       = 1/(2L) Σ_j [D_{a_j}(view 1, local_j) + D_{b_j}(view 2, local_j)],  a_j, b_j ~ U{0..S-1} i.i.d.
    restore     = mean_{v ∈ restore_views} MSE(reconstruction_v, target_v)
    multiscale  = mean_{v ∈ restore_views} MSE(upsample(m_v[l*]), target_v)
    loss        = w_r·restore + w_m·β·multiscale + w_g·global + w_l·local

where ``D`` is the symmetric SimSiam negative cosine with stop-gradient on the targets. β comes from
:func:`beta_schedule` (a pure function of the step, so resuming needs no state) and is passed in; the
random scales come from a generator the engine passes in, never from module-global state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcrl.config import BetaSchedule, BnStats
from pcrl.model import PCRLv2Output, PCRLv2UNet, ScaleFeatures, build_model, frozen_buffers

if TYPE_CHECKING:
    from pcrl.config import ObjectiveConfig, PretrainConfig

__all__ = [
    "LOSS_TERMS",
    "PCRLv2Objective",
    "PCRLv2Task",
    "SiameseCosineLoss",
    "beta_schedule",
    "build_task",
]

# The loss terms of the objective's output: the weighted total, then the raw terms.
LOSS_TERMS = ("loss", "restore", "multiscale", "global", "local")


def beta_schedule(step: int, total_steps: int, kind: BetaSchedule = "cosine") -> float:
    """Weight β of the multi-scale restoration term at a global step.

    ``cosine``: β = ½(1 + cos(π·step/total_steps)), with ``step`` clamped to [0, total_steps] (1 → 0; the
    reference hard-codes 240 epochs instead, docs/method.md R2). ``constant``: β = 1.

    Raises:
        ValueError: ``total_steps < 1`` or an unknown ``kind``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"kind must be one of {get_args(BetaSchedule)}, got {kind!r}")
    progress = min(max(step, 0), total_steps) / total_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class SiameseCosineLoss(nn.Module):
    """Symmetric SimSiam negative cosine with stop-gradient on the targets.

    ``D = -½ [mean_b cos(pred_a, sg(target_b)) + mean_b cos(pred_b, sg(target_a))]``, cosine along dim 1 with
    eps 1e-8. D ∈ [-1, 1]; -1 when predictions match the other view's targets. Computed in float32 so bf16/fp16
    engines log the same values.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, target_a: Tensor, pred_a: Tensor, target_b: Tensor, pred_b: Tensor) -> Tensor:
        """Args: four (B, C) tensors (targets z and predictions p of views a and b). Returns a 0-dim tensor.

        Raises:
            ValueError: the four shapes differ or are not (B, C).
        """
        shapes = [tuple(t.shape) for t in (target_a, pred_a, target_b, pred_b)]
        if len(set(shapes)) != 1 or len(shapes[0]) != 2:
            raise ValueError(
                f"expected four (B, C) tensors of one shape, got target_a {shapes[0]}, pred_a {shapes[1]}, "
                f"target_b {shapes[2]}, pred_b {shapes[3]}"
            )
        cos_ab = F.cosine_similarity(pred_a.float(), target_b.detach().float(), dim=1, eps=self.eps).mean()
        cos_ba = F.cosine_similarity(pred_b.float(), target_a.detach().float(), dim=1, eps=self.eps).mean()
        return -0.5 * (cos_ab + cos_ba)


def _siamese(loss: SiameseCosineLoss, a: ScaleFeatures, b: ScaleFeatures) -> Tensor:
    return loss(a.target, a.prediction, b.target, b.prediction)


def _rows(features: ScaleFeatures, start: int, stop: int) -> ScaleFeatures:
    return ScaleFeatures(features.target[start:stop], features.prediction[start:stop])


class PCRLv2Objective(nn.Module):
    """The four PCRLv2 terms (docs/method.md §3) with configurable weights and restored views
    (docs/method.md D5).

    Args:
        restore: weight of the full-resolution restoration MSE.
        multiscale: weight of β·MSE of the randomly chosen decoder stage's restoration head.
        global_: weight of the siamese view 1 ↔ view 2 term.
        local: weight of the local ↔ global term.
        restore_views: global views (1 and/or 2) that are restored; ``(1,)`` is the reference.

    Raises:
        ValueError: a negative weight or invalid ``restore_views``.
    """

    def __init__(
        self,
        restore: float = 1.0,
        multiscale: float = 1.0,
        global_: float = 1.0,
        local: float = 1.0,
        restore_views: Sequence[int] = (1,),
    ) -> None:
        super().__init__()
        for name, value in (
            ("restore", restore),
            ("multiscale", multiscale),
            ("global_", global_),
            ("local", local),
        ):
            if value < 0:
                raise ValueError(f"{name} weight must be >= 0, got {value}")
        views = tuple(restore_views)
        # ObjectiveConfig checks the same rule when a config loads (naming objective.restore_views, before
        # any process starts); this check is for callers that build the objective directly.
        if not views or not set(views) <= {1, 2} or len(set(views)) != len(views):
            raise ValueError(f"restore_views must be (1,), (2,) or (1, 2), got {list(restore_views)}")
        self.restore_weight = float(restore)
        self.multiscale_weight = float(multiscale)
        self.global_weight = float(global_)
        self.local_weight = float(local)
        self.restore_views = views
        self.siamese = SiameseCosineLoss()

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig) -> PCRLv2Objective:
        """Build from the ``objective`` config section."""
        w = cfg.weights
        return cls(w.restore, w.multiscale, w.global_, w.local, restore_views=cfg.restore_views)

    def forward(
        self,
        out1: PCRLv2Output,
        out2: PCRLv2Output,
        out_local: PCRLv2Output,
        targets: Tensor,
        beta: float,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """Compute the weighted loss and its raw terms.

        Args:
            out1: model output for global view 1 (B samples); needs reconstructions if 1 ∈ restore_views.
            out2: model output for global view 2 (B samples); needs reconstructions if 2 ∈ restore_views.
            out_local: model output for the L·B local views, j-major: rows [j·B, (j+1)·B) are local view j of
                every sample.
            targets: (B, 2, 1, X, Y, Z) un-degraded restoration targets of views 1 and 2.
            beta: weight of the multi-scale term at this step (see :func:`beta_schedule`).
            generator: CPU generator for the random scales; draws, in order, l* then the (2, L) scales a_j, b_j.

        Returns:
            ``loss`` (weighted total), the raw unweighted terms ``restore``, ``multiscale``, ``global``,
            ``local`` (0-dim float32) and ``scale`` (0-dim int64 l*).

        Raises:
            ValueError: inconsistent shapes or scale counts (the message gives them), or a missing
                reconstruction for a restored view.
        """
        batch = targets.shape[0]
        num_scales = len(out1.scale_features)
        self._check(out1, out2, out_local, targets, num_scales)
        num_locals = out_local.scale_features[0].target.shape[0] // batch

        scale = torch.randint(num_scales, (), generator=generator)
        local_scales = torch.randint(num_scales, (2, num_locals), generator=generator).tolist()
        s = int(scale)

        global_term = _siamese(self.siamese, out1.scale_features[s], out2.scale_features[s])

        local_terms = []
        for j in range(num_locals):
            a, b = local_scales[0][j], local_scales[1][j]
            local_a = _rows(out_local.scale_features[a], j * batch, (j + 1) * batch)
            local_b = _rows(out_local.scale_features[b], j * batch, (j + 1) * batch)
            local_terms.append(_siamese(self.siamese, out1.scale_features[a], local_a))
            local_terms.append(_siamese(self.siamese, out2.scale_features[b], local_b))
        local_term = torch.stack(local_terms).sum() / (2 * num_locals)

        restore_terms, multiscale_terms = [], []
        for v in self.restore_views:
            out = out1 if v == 1 else out2
            target = targets[:, v - 1].float()  # (B, 1, X, Y, Z)
            assert out.reconstruction is not None and out.scale_reconstructions is not None  # checked above
            restore_terms.append(F.mse_loss(out.reconstruction.float(), target))
            coarse = out.scale_reconstructions[s].float()
            # Only the drawn scale is upsampled (the reference upsamples all three); the target is never
            # downsampled (docs/method.md §3.2).
            if coarse.shape[2:] != target.shape[2:]:
                coarse = F.interpolate(coarse, size=target.shape[2:], mode="trilinear", align_corners=False)
            multiscale_terms.append(F.mse_loss(coarse, target))
        restore_term = torch.stack(restore_terms).mean()
        multiscale_term = torch.stack(multiscale_terms).mean()

        loss = (
            self.restore_weight * restore_term
            + self.multiscale_weight * beta * multiscale_term
            + self.global_weight * global_term
            + self.local_weight * local_term
        )
        return {
            "loss": loss,
            "restore": restore_term,
            "multiscale": multiscale_term,
            "global": global_term,
            "local": local_term,
            "scale": scale,
        }

    def _check(
        self,
        out1: PCRLv2Output,
        out2: PCRLv2Output,
        out_local: PCRLv2Output,
        targets: Tensor,
        num_scales: int,
    ) -> None:
        if targets.ndim != 6 or targets.shape[1:3] != (2, 1):
            raise ValueError(f"targets must be (B, 2, 1, X, Y, Z), got {tuple(targets.shape)}")
        batch = targets.shape[0]
        counts = [len(o.scale_features) for o in (out1, out2, out_local)]
        if num_scales < 1 or len(set(counts)) != 1:
            raise ValueError(
                f"out1, out2 and out_local must have the same (>= 1) number of scales, got {counts}"
            )
        for name, out in (("out1", out1), ("out2", out2)):
            rows = out.scale_features[0].target.shape[0]
            if rows != batch:
                raise ValueError(f"{name} has {rows} samples but targets {tuple(targets.shape)} has {batch}")
        local_rows = out_local.scale_features[0].target.shape[0]
        if local_rows == 0 or local_rows % batch:
            raise ValueError(
                f"out_local must have L·B rows (j-major) for B = {batch}, got {local_rows} "
                f"(targets {tuple(targets.shape)})"
            )
        for v in self.restore_views:
            out = out1 if v == 1 else out2
            if out.reconstruction is None or out.scale_reconstructions is None:
                raise ValueError(
                    f"view {v} is in restore_views but out{v} has no reconstructions (local=True?)"
                )
            expected = (batch, *targets.shape[2:])
            if tuple(out.reconstruction.shape) != expected:
                raise ValueError(
                    f"out{v}.reconstruction {tuple(out.reconstruction.shape)} does not match targets[:, {v - 1}] "
                    f"{expected}"
                )
            if len(out.scale_reconstructions) != num_scales:
                raise ValueError(
                    f"out{v} has {len(out.scale_reconstructions)} scale reconstructions for {num_scales} scales"
                )


class PCRLv2Task(nn.Module):
    """Model + objective as one module: what the DeepSpeed engine wraps (``engine(**batch, beta=, generator=)``).

    Three forwards, as the reference: view 1, view 2 (separate calls, so BatchNorm statistics are per view) and
    all local views in one batch. A global view that is not restored runs with ``local=True`` (features only),
    which skips the work the reference spends on view 2's unused reconstruction (docs/method.md R1).

    The BatchNorm running statistics are used only in eval mode, never by a training step, so which forwards
    update them changes no loss and no weight, only what an eval-mode (exported) encoder normalises with.

    Args:
        model: the U-Net with heads.
        objective: the loss.
        bn_stats: ``global`` (default): only the two global views' forwards update the running statistics, so
            they describe global-size crops, the inputs a downstream user gives the encoder; ``all``: every
            forward does, the last being the local views' (the reference's behaviour).
    """

    def __init__(self, model: PCRLv2UNet, objective: PCRLv2Objective, bn_stats: BnStats = "global") -> None:
        super().__init__()
        if bn_stats not in get_args(BnStats):
            raise ValueError(f"bn_stats must be one of {get_args(BnStats)}, got {bn_stats!r}")
        self.model = model
        self.objective = objective
        self.bn_stats = bn_stats

    def forward(
        self,
        global_views: Tensor,
        global_targets: Tensor,
        local_views: Tensor,
        beta: float,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """Run the three forwards and the objective.

        Args:
            global_views: (B, 2, 1, X, Y, Z) degraded, z-normalised network inputs of views 1 and 2.
            global_targets: (B, 2, 1, X, Y, Z) un-degraded restoration targets in [0, 1].
            local_views: (B, L, 1, x, y, z) local views.
            beta: multi-scale weight at this step.
            generator: CPU generator for the random scales.

        Returns:
            The objective's dict (``loss``, ``restore``, ``multiscale``, ``global``, ``local``, ``scale``).

        Raises:
            ValueError: wrong input shapes (the message gives them).
        """
        if global_views.ndim != 6 or global_views.shape[1] != 2:
            raise ValueError(f"global_views must be (B, 2, C, X, Y, Z), got {tuple(global_views.shape)}")
        if global_targets.shape != (*global_views.shape[:2], 1, *global_views.shape[3:]):
            raise ValueError(
                f"global_targets must be (B, 2, 1, X, Y, Z) matching global_views {tuple(global_views.shape)}, "
                f"got {tuple(global_targets.shape)}"
            )
        if local_views.ndim != 6 or local_views.shape[0] != global_views.shape[0]:
            raise ValueError(
                f"local_views must be (B, L, C, x, y, z) with B = {global_views.shape[0]}, got {tuple(local_views.shape)}"
            )
        # bf16/fp16 engines cast the parameters but not our inputs.
        dtype = next(self.model.parameters()).dtype
        global_views = global_views.to(dtype)
        local_views = local_views.to(dtype)

        restored = self.objective.restore_views
        out1 = self.model(global_views[:, 0], local=1 not in restored)
        out2 = self.model(global_views[:, 1], local=2 not in restored)
        # (B, L, C, x, y, z) -> (L, B, C, x, y, z) -> (L·B, C, x, y, z): j-major, rows [j·B, (j+1)·B) = local j.
        locals_jmajor = local_views.transpose(0, 1).reshape(-1, *local_views.shape[2:])
        keep_stats = self.bn_stats == "global" and self.training
        with frozen_buffers(self.model) if keep_stats else contextlib.nullcontext():
            out_local = self.model(locals_jmajor, local=True)
        return self.objective(out1, out2, out_local, global_targets, beta, generator)


def build_task(
    cfg: PretrainConfig, world: int = 1, activation_checkpointing: bool | None = None
) -> PCRLv2Task:
    """The model and objective a run trains, as the DeepSpeed engine wraps them.

    Args:
        cfg: the resolved config.
        world: processes in the run; with ``model.norm=sync_batch`` and more than one, BatchNorm syncs.
        activation_checkpointing: overrides ``model.activation_checkpointing`` (FLOP counting turns it off).
    """
    model = build_model(cfg.model)
    if cfg.model.norm == "sync_batch" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.activation_checkpointing if activation_checkpointing is None else activation_checkpointing:
        model.enable_activation_checkpointing()
    return PCRLv2Task(model, PCRLv2Objective.from_config(cfg.objective), cfg.model.bn_stats)
