"""Pictures of a run: the reconstruction panel that rank 0 draws every ``tracking.image_every`` steps.

The panel shows what the restoration terms train. For a fixed set of volumes (picked and rendered once, with
a fixed seed) it draws one global view each: the clean target, the degraded network input, the restoration
of every decoder scale (upsampled to the view, as the multi-scale term compares it) and the full-resolution
output. Each is shown as the three middle planes of the view.

* **Orientation** (views are RAS+ with array axes (x, y, z); the panel renders them without the random
  flip, so a mirrored volume is visible): radiological. Axial and coronal planes show the patient's right on
  the viewer's left; axial has anterior up; coronal and sagittal have superior up; sagittal has anterior
  on the left. Pixels keep the physical aspect of the view's voxels (crop box / view size).
* **Windowing**: targets, restorations and outputs are in the training units [0, 1] (CT: ``data.ct_window``
  in HU; MRI: its 0.5/99.5 percentiles) and are shown on [0, 1]. The degraded input is z-normalised per
  view (what the network sees) and shown on ±3 standard deviations.
* **BatchNorm**: the model runs in training mode, with batch statistics over the panel's own fixed views,
  which is how the restoration loss sees the network (early in a run the running statistics have barely
  moved, and with ``model.bn_stats=all`` the local crops update them last). The forward runs on a private
  copy of the weights, so the training model's mode, running statistics and SyncBatchNorm collectives are
  never touched, and no other rank waits for it.

Example::

    panel = ReconstructionPanel.from_config(cfg, device)   # reads and renders the fixed views once
    path = panel.save(engine.module.model, step, run_dir / "images")  # images/recon_step_00000060.png
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcrl.io import atomic_path
from pcrl.shards import middle_planes  # re-exported: it lives beside the array contract

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pcrl.config import PretrainConfig
    from pcrl.shards import SampleRecord

__all__ = ["PanelView", "ReconstructionPanel", "draw_panel", "middle_planes", "panel_views", "restore"]

logger = logging.getLogger(__name__)

# Seed stream of the panel's views: distinct from the loader's (seed, epoch, index, pair) streams.
_PANEL_STREAM = 0x9A7E1
# The degraded input is z-normalised; ±3 standard deviations hold nearly all of it.
_INPUT_WINDOW = 3.0
# Inches per image cell and the resolution of the PNG.
_CELL_IN = 1.3
_DPI = 100


@dataclass(frozen=True)
class PanelView:
    """One fixed global view of the panel.

    Attributes:
        name: what the panel calls the volume (its source file name).
        key: the volume's manifest key.
        modality: ``ct`` or ``mr``.
        view: (1, X, Y, Z) float32 degraded, z-normalised network input.
        target: (1, X, Y, Z) float32 clean view in [0, 1].
        spacing: (x, y, z) mm per view voxel (crop box size / view size).
    """

    name: str
    key: str
    modality: str
    view: Tensor
    target: Tensor
    spacing: tuple[float, float, float]


def _pick(records: Sequence[SampleRecord], n: int) -> list[SampleRecord]:
    """The first ``n`` records in manifest order, alternating between modalities when several are present
    (so a mixed data set shows both CT and MRI)."""
    queues: dict[str, list[SampleRecord]] = {}
    for r in records:
        queues.setdefault(r.modality, []).append(r)
    picked: list[SampleRecord] = []
    while len(picked) < min(n, len(records)):
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def panel_views(cfg: PretrainConfig) -> list[PanelView]:
    """Pick the panel's ``tracking.image_volumes`` volumes and render one global view of each, once.

    Volumes come from ``tracking.image_split`` (held out), or, when that split is empty, from the first
    volumes of ``data.split``; with fewer volumes than asked for, volumes repeat with another crop. Views are
    rendered by :class:`pcrl.views.PCRLv2Views` with the training config (crops, scale, rotation,
    degradation) but no random flip, each with a seed fixed by ``run.seed`` and its position.

    Returns:
        ``tracking.image_volumes`` views.

    Raises:
        FileNotFoundError / ValueError: no manifest or no volume at all (see :func:`pcrl.shards.read_manifest`).
    """
    from pcrl.data import fixed_views
    from pcrl.shards import split_or_fallback
    from pcrl.views import PCRLv2Views

    records, fell_back = split_or_fallback(cfg.data.shards, cfg.tracking.image_split, cfg.data.split)
    if fell_back:
        logger.info(
            "reconstruction panel: split %r has no volumes; showing the first volumes of %r",
            cfg.tracking.image_split,
            cfg.data.split,
        )
    picked = _pick(records, cfg.tracking.image_volumes)
    if not picked:
        raise ValueError(f"no volumes for the reconstruction panel in {cfg.data.shards}")

    views = PCRLv2Views(dataclasses.replace(cfg.views, flip_prob=0.0))
    samples = [
        (picked[i % len(picked)], (cfg.run.seed, _PANEL_STREAM, i)) for i in range(cfg.tracking.image_volumes)
    ]
    out = []
    for record, sample in fixed_views(cfg, views, samples):
        box_size = sample["boxes"]["global"][0, 1].tolist()  # type: ignore[index]
        spacing = tuple(b / s for b, s in zip(box_size, cfg.views.global_size, strict=True))
        out.append(
            PanelView(
                name=Path(record.source).name or record.key,
                key=record.key,
                modality=record.modality,
                view=sample["global_views"][0].clone(),  # type: ignore[index]
                target=sample["global_targets"][0].clone(),  # type: ignore[index]
                spacing=spacing,  # type: ignore[arg-type]
            )
        )
    return out


@torch.no_grad()
def restore(model: nn.Module, views: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Run the model on the panel's views as it is: mode, dtype and device are the model's.

    Args:
        model: a :class:`pcrl.model.PCRLv2UNet` (in training mode for batch statistics).
        views: (N, 1, X, Y, Z) degraded views, N >= 2 in training mode.

    Returns:
        The full-resolution output (N, 1, X, Y, Z) and one restoration per decoder scale, coarsest first,
        each upsampled trilinearly to (N, 1, X, Y, Z) as the multi-scale term does; float32 on the CPU.
    """
    p = next(model.parameters())
    out = model(views.to(p.device, p.dtype))
    size = views.shape[2:]
    scales = [
        m.float() if m.shape[2:] == size else F.interpolate(m.float(), size=size, mode="trilinear")
        for m in out.scale_reconstructions
    ]
    return out.reconstruction.float().cpu(), [s.cpu() for s in scales]


def draw_panel(
    views: Sequence[PanelView],
    reconstruction: Tensor,
    scales: Sequence[Tensor],
    step: int,
    ct_window: Sequence[float] = (-1000.0, 1000.0),
) -> Figure:
    """Draw the reconstruction panel (matplotlib, no display needed).

    One column group per volume (axial, coronal, sagittal); rows: target, degraded input, the restoration of
    each decoder scale, the output. Restorations carry their MSE against the target.

    Args:
        views: the N fixed views.
        reconstruction: (N, 1, X, Y, Z) full-resolution output.
        scales: per decoder scale, coarsest first, (N, 1, X, Y, Z) upsampled restorations.
        step: the training step (in the title).
        ct_window: HU mapped to [0, 1] (in the caption).

    Returns:
        The figure; ``fig.savefig(path)`` writes it.
    """
    from matplotlib.figure import Figure

    n, num_scales = len(views), len(scales)
    size = tuple(views[0].target.shape[1:])
    rows: list[tuple[str, str]] = [
        ("target", "clean view\n[0, 1]"),
        ("input", f"degraded\nz-score ±{_INPUT_WINDOW:g}σ"),
    ]
    for level in range(num_scales):
        factor = 2 ** (num_scales - 1 - level)
        coarse = "×".join(str(s // factor) for s in size)
        upsampled = " ↑" if factor > 1 else ""
        rows.append((f"scale {level + 1} (1/{factor})", f"{coarse}{upsampled}, [0, 1]"))
    rows.append(("output", "full res., [0, 1]"))

    label_w, gap = 1.3, 0.25
    width = label_w + n * 3 * _CELL_IN + (n - 1) * gap + 0.2
    height = 0.75 + len(rows) * _CELL_IN + 0.75
    fig = Figure(figsize=(width, height), dpi=_DPI, facecolor="white")
    ratios = []
    for i in range(n):
        ratios += [1.0, 1.0, 1.0] + ([gap / _CELL_IN] if i < n - 1 else [])
    grid = fig.add_gridspec(
        len(rows),
        len(ratios),
        width_ratios=ratios,
        left=label_w / width,
        right=1 - 0.2 / width,
        top=1 - 0.75 / height,
        bottom=0.75 / height,
        wspace=0.05,
        hspace=0.12,
    )
    fig.suptitle(f"step {step}: reconstructions of {n} fixed views", fontsize=11, y=1 - 0.12 / height)

    for i, pv in enumerate(views):
        col0 = i * 4
        target = pv.target[0].numpy()
        images = [(target, 0.0, 1.0, None), (pv.view[0].numpy(), -_INPUT_WINDOW, _INPUT_WINDOW, None)]
        for restored in (*scales, reconstruction):
            r = restored[i, 0].numpy()
            images.append((r, 0.0, 1.0, float(np.mean((r - target) ** 2))))
        for plane, title in enumerate(("axial", "coronal", "sagittal")):
            cell = grid[0, col0 + plane].get_position(fig)
            fig.text(cell.x0 + cell.width / 2, cell.y1 + 0.06 / height, title, ha="center", fontsize=8)
        cell = grid[0, col0 + 1].get_position(fig)
        fig.text(
            cell.x0 + cell.width / 2,
            cell.y1 + 0.28 / height,
            f"{pv.name} · {pv.modality.upper()} · {pv.key[:8]}",
            ha="center",
            fontsize=9,
            weight="bold",
        )
        sx, sy, sz = pv.spacing
        aspects = (sy / sx, sz / sx, sz / sy)  # rows / columns of each plane, in mm
        for row, (volume, vmin, vmax, mse) in enumerate(images):
            for plane, (image, aspect) in enumerate(zip(middle_planes(volume), aspects, strict=True)):
                ax = fig.add_subplot(grid[row, col0 + plane])
                ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if mse is not None and plane == 0:
                    ax.text(
                        0.03,
                        0.03,
                        f"MSE {mse:.4f}",
                        transform=ax.transAxes,
                        fontsize=6.5,
                        color="yellow",
                        va="bottom",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0},
                    )
                if i == 0 and plane == 0:
                    name, detail = rows[row]
                    ax.set_ylabel(
                        f"{name}\n{detail}", rotation=0, ha="right", va="center", fontsize=8, labelpad=6
                    )

    lo, hi = ct_window
    fig.text(
        0.5,
        0.3 / height,
        "Middle planes of one global view per volume, radiological: axial and coronal show the patient's "
        "right on the left; axial anterior up; coronal and sagittal superior up; sagittal anterior left.\n"
        f"[0, 1] = CT {lo:g} to {hi:g} HU, MRI 0.5-99.5 percentiles. Input z-scored per view, shown at "
        f"±{_INPUT_WINDOW:g}σ. Batch statistics over these views (training mode). MSE against the target.",
        ha="center",
        va="center",
        fontsize=6.5,
        color="#444444",
        wrap=True,
    )
    return fig


class ReconstructionPanel:
    """The reconstruction panel of a run: fixed views, a private copy of the model, and the drawing.

    Build it on rank 0 only; :meth:`save` involves no collective, so the other ranks never wait on it.

    Args:
        views: the fixed views (:func:`panel_views`), N >= 2.
        model: a model of the training architecture, used as the private copy (its weights are replaced
            at every :meth:`save`); it is kept in training mode (module docstring: BatchNorm).
        ct_window: HU mapped to [0, 1] (caption).
    """

    def __init__(self, views: Sequence[PanelView], model: nn.Module, ct_window: Sequence[float]) -> None:
        if len(views) < 2:
            raise ValueError(f"the panel needs at least 2 views for batch statistics, got {len(views)}")
        self.views = list(views)
        self.model = model.train()
        self.ct_window = tuple(ct_window)
        self.enabled = True
        self._inputs = torch.stack([v.view for v in self.views])  # (N, 1, X, Y, Z)

    @classmethod
    def from_config(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> ReconstructionPanel:
        """Pick and render the fixed views (:func:`panel_views`) and build the private model on ``device``."""
        from pcrl.model import private_model

        model = private_model(cfg.model, device)
        views = panel_views(cfg)
        logger.info(
            "reconstruction panel every %d steps: %s",
            cfg.tracking.image_every,
            ", ".join(f"{v.name} ({v.modality})" for v in views),
        )
        return cls(views, model, cfg.data.ct_window)

    def figure(self, model: nn.Module, step: int) -> Figure:
        """Copy ``model``'s weights (any dtype, memory format, plain or SyncBatchNorm) into the private
        copy, run it on the fixed views and draw the panel."""
        self.model.load_state_dict(model.state_dict())
        reconstruction, scales = restore(self.model, self._inputs)
        return draw_panel(self.views, reconstruction, scales, step, self.ct_window)

    def save(self, model: nn.Module, step: int, folder: Path) -> Path | None:
        """Write ``folder/recon_step_<step:08d>.png`` and return its path.

        A failure to draw must not end a long run: it is logged with its traceback, panels are turned off
        for the rest of the run, and None is returned.
        """
        if not self.enabled:
            return None
        path = Path(folder) / f"recon_step_{step:08d}.png"
        try:
            fig = self.figure(model, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
        except Exception:
            logger.exception(
                "could not draw the reconstruction panel at step %d; no more panels this run", step
            )
            self.enabled = False
            return None
        return path
