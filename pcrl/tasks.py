"""Labelled downstream data: real cases with lesion masks, and the patches cut from them.

The cases are written by ``python -m data_prep.labelled`` (one ``<name>.npz`` per case and ``cases.json``):
the pyradiomics lung CTs, brain MRIs and breast MRI with their lesion masks, at 1 mm in RAS+ (x, y, z), with
the shards' intensity policy. This module maps them to [0, 1] the way the pretraining loader does
(:func:`pcrl.data.to_unit_range`) and cuts fixed patches, z-normalised per patch like the pretraining views:

* **lesion** patches are centred on a lesion voxel (label 1);
* **background** patches hold no lesion voxel at all, and their centre's intensity lies within the lesion's
  own 5–95 % intensity range (label 0), so brightness alone does not separate the classes.

Tasks use them leave-one-case-out: patches of the held-out case are never trained on.

Example::

    cases = read_cases(".cache/labelled", ct_window=(-1000, 1000))
    patches = lesion_patches(cases[0], size=(32, 32, 16), per_class=16, seed=0)
    patches.images.shape  # (32, 1, 32, 32, 16); patches.labels (32,); patches.masks (32, 1, 32, 32, 16)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pcrl.data import to_unit_range

__all__ = ["LabelledCase", "Patches", "lesion_patches", "lesion_roi", "normalise_patches", "read_cases"]

_CASES = "cases.json"


@dataclass(frozen=True)
class LabelledCase:
    """One labelled volume.

    Attributes:
        name: the case name (``lung1``, ``brain2``, ...).
        modality: ``ct`` or ``mr``.
        image: (X, Y, Z) float32 in [0, 1].
        label: (X, Y, Z) bool lesion mask.
    """

    name: str
    modality: str
    image: Tensor
    label: Tensor


@dataclass(frozen=True)
class Patches:
    """Patches of one or more cases.

    Attributes:
        images: (N, 1, X, Y, Z) float32, z-normalised per patch.
        labels: (N,) int64, 1 = centred on a lesion, 0 = no lesion voxel in the patch.
        masks: (N, 1, X, Y, Z) int64 lesion masks (segmentation targets).
        cases: (N,) index of the case each patch comes from.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    cases: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> Patches:
        """The patches at ``index`` (a (M,) long tensor or a (N,) bool mask)."""
        return Patches(self.images[index], self.labels[index], self.masks[index], self.cases[index])

    @staticmethod
    def cat(parts: Sequence[Patches]) -> Patches:
        return Patches(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.masks for p in parts]),
            torch.cat([p.cases for p in parts]),
        )


def read_cases(
    folder: str | Path, ct_window: Sequence[float], names: Sequence[str] | None = None
) -> list[LabelledCase]:
    """Read the labelled cases of ``folder`` (all, or those in ``names``, in that order).

    Raises:
        FileNotFoundError: no ``cases.json`` in ``folder`` (the message gives the command that makes it).
        ValueError: a name in ``names`` is not a case there.
    """
    folder = Path(folder)
    index = folder / _CASES
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder}: no labelled cases ({_CASES} missing); make them with python -m data_prep.labelled "
            f"--output {folder}"
        )
    entries = {c["name"]: c for c in json.loads(index.read_text())["cases"]}
    wanted = list(entries) if not names else list(names)
    unknown = [n for n in wanted if n not in entries]
    if unknown:
        raise ValueError(f"{index}: no case named {unknown}; cases there: {', '.join(entries)}")
    cases = []
    for name in wanted:
        with np.load(folder / entries[name]["file"], allow_pickle=False) as npz:
            modality = str(npz["modality"])
            image = to_unit_range(npz["image"], modality, ct_window)
            label = torch.from_numpy(npz["label"] > 0)
        cases.append(LabelledCase(name, modality, image, label))
    return cases


def normalise_patches(x: Tensor) -> Tensor:
    """Z-score each patch over its voxels, as the pretraining views are: (N, C, X, Y, Z) -> same shape."""
    flat = x.flatten(1)
    mean = flat.mean(1).view(-1, *([1] * (x.ndim - 1)))
    std = flat.std(1).clamp_min(1e-6).view(-1, *([1] * (x.ndim - 1)))
    return (x - mean) / std


def _padded(case: LabelledCase, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Image and label padded at the far end to at least ``size`` (a small crop, such as breast1)."""
    pad = [max(0, s - n) for s, n in zip(size, case.image.shape, strict=True)]
    if not any(pad):
        return case.image, case.label
    spec = [v for p in reversed(pad) for v in (0, p)]
    image = torch.nn.functional.pad(case.image[None], spec, mode="replicate")[0]
    label = torch.nn.functional.pad(case.label[None].float(), spec)[0] > 0
    return image, label


def _start(center: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> list[int]:
    return [min(max(0, int(c) - s // 2), n - s) for c, s, n in zip(center, size, shape, strict=True)]


def lesion_patches(
    case: LabelledCase, size: Sequence[int], per_class: int, seed: int, case_index: int = 0
) -> Patches:
    """Cut ``per_class`` lesion and ``per_class`` background patches of ``size`` (x, y, z) voxels from ``case``.

    Deterministic for a given ``seed``. Patches come from the lesion's bounding box grown by two patches on
    every side; a region smaller than ``size`` is padded (edge values, no lesion).

    Returns:
        :class:`Patches` with 2·per_class patches, lesions first.

    Raises:
        ValueError: the case has no lesion voxel, or no background position fits (patch too large).
    """
    rng = np.random.default_rng([seed, case_index, 0x7A5C])
    # Background is drawn near the lesion (within two patches of its bounding box): the hard, relevant
    # negatives, and a region small enough to search quickly in a 300³ CT.
    region = lesion_roi(case, [2 * s for s in size])
    image, label = _padded(
        LabelledCase(case.name, case.modality, case.image[region], case.label[region]), size
    )
    shape = image.shape
    lesion = torch.nonzero(label).numpy()
    if len(lesion) == 0:
        raise ValueError(f"case {case.name}: the mask has no lesion voxel")
    # Positions whose patch holds no lesion voxel: a box sum over the mask, via a 3D cumulative sum.
    cum = torch.nn.functional.pad(label.to(torch.int32), (1, 0, 1, 0, 1, 0)).cumsum(0).cumsum(1).cumsum(2)
    sx, sy, sz = size
    nx, ny, nz = (n - s + 1 for n, s in zip(shape, size, strict=True))
    box = (
        cum[sx : sx + nx, sy : sy + ny, sz : sz + nz]
        - cum[:nx, sy : sy + ny, sz : sz + nz]
        - cum[sx : sx + nx, :ny, sz : sz + nz]
        - cum[sx : sx + nx, sy : sy + ny, :nz]
        + cum[:nx, :ny, sz : sz + nz]
        + cum[:nx, sy : sy + ny, :nz]
        + cum[sx : sx + nx, :ny, :nz]
        - cum[:nx, :ny, :nz]
    )  # (nx, ny, nz): lesion voxels in the patch starting there
    centres = image[sx // 2 : sx // 2 + nx, sy // 2 : sy // 2 + ny, sz // 2 : sz // 2 + nz]
    lo, hi = np.quantile(image[label].numpy(), [0.05, 0.95])
    free = torch.nonzero((box == 0) & (centres >= float(lo)) & (centres <= float(hi))).numpy()
    if len(free) == 0:
        free = torch.nonzero(box == 0).numpy()
    if len(free) == 0:
        raise ValueError(
            f"case {case.name}: no {list(size)} patch without lesion fits in shape {list(shape)}"
        )
    starts = [_start(lesion[i], size, shape) for i in rng.integers(0, len(lesion), per_class)]
    starts += [list(free[i]) for i in rng.integers(0, len(free), per_class)]
    crops = [tuple(slice(int(a), int(a) + s) for a, s in zip(st, size, strict=True)) for st in starts]
    images = torch.stack([image[c] for c in crops])[:, None]
    masks = torch.stack([label[c] for c in crops])[:, None].long()
    labels = torch.tensor([1] * per_class + [0] * per_class)
    return Patches(normalise_patches(images), labels, masks, torch.full((2 * per_class,), case_index))


def lesion_roi(case: LabelledCase, size: Sequence[int]) -> tuple[slice, slice, slice]:
    """The lesion's bounding box grown by ``size`` voxels on every side, clipped to the volume: where the
    segmentation task is scored with one patch size (a whole 300³ CT would take minutes per case on CPU).
    The box is at least ``size`` wide where the volume allows."""
    idx = torch.nonzero(case.label)
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    shape = case.image.shape
    out = []
    for a, b, s, n in zip(lo, hi, size, shape, strict=True):
        start, stop = max(0, a - s), min(n, b + 1 + s)
        if stop - start < s:  # at least one patch; a volume smaller than a patch is padded by the caller
            start = max(0, min(start, n - s))
            stop = min(n, start + s)
        out.append(slice(start, stop))
    return tuple(out)  # type: ignore[return-value]
