"""Labelled downstream data: real cases with lesion masks, and the patches cut from them.

The cases are written by ``python -m data_prep.labelled`` (one ``<name>.npz`` per case and ``cases.json``):
the pyradiomics lung CTs, brain MRIs and breast MRI with their lesion masks, at 1 mm in RAS+ (x, y, z), with
the shards' intensity policy. This module maps them to [0, 1] the way the pretraining loader does
(:func:`pcrl.shards.to_unit_range`) and cuts fixed patches, z-normalised per patch like the pretraining views:

* **lesion** patches are centred on a lesion voxel (label 1);
* **background** patches hold no lesion voxel at all, and their centre's intensity lies within the lesion's
  own 5–95 % intensity range (label 0), so brightness alone does not separate the classes.

Tasks use them leave-one-case-out: patches of the held-out case are never trained on. These cases are the
demo's pretraining volumes, so the lesion tasks are not disjoint from pretraining data.

The **AAL task** (:func:`read_aal`, :func:`aal_patches`) uses a volume pretraining never sees: the Colin27 T1
with its AAL atlas (``python -m data_prep.labelled --task aal`` writes ``colin27.npz`` and ``aal.json`` in the
same folder). The 116 AAL regions are grouped into lobes by the atlas's own codes (:data:`AAL_LOBES`); a patch
is centred on a voxel of a lobe and labelled with it; the two "cases" are the hemispheres. See
:func:`aal_patches` for why that split keeps train and test apart.

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

from pcrl.shards import to_unit_range

__all__ = [
    "AAL_LOBES",
    "AalVolume",
    "LabelledCase",
    "Patches",
    "aal_patches",
    "aal_starts",
    "lesion_patches",
    "lesion_roi",
    "normalise_patches",
    "probe_task",
    "read_aal",
    "read_cases",
]

_CASES = "cases.json"
_AAL = "aal.json"

AAL_LOBES: dict[int, str] = {
    2: "frontal",
    5: "occipital",
    6: "parietal",
    7: "deep grey",
    8: "temporal",
    9: "cerebellum",
}
"""Classes of the AAL task: the thousands of an AAL region code → class name (2xxx frontal ... 9xxx cerebellum).
The small insula (3xxx) and the limbic group (4xxx, mostly cingulate cortex hugging the midline, where few
patches fit inside one hemisphere) are left out, as is the vermis (no hemisphere)."""


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


@dataclass(frozen=True)
class AalVolume:
    """The Colin27 T1 with its AAL regions grouped into the classes of :data:`AAL_LOBES`.

    Attributes:
        image: (X, Y, Z) float32 in [0, 1], RAS+ at 1 mm.
        classes: (X, Y, Z) int64 class index into ``class_names``; -1 outside the classes.
        hemisphere: (X, Y, Z) int8, 0 left, 1 right, -1 neither (vermis, outside the atlas).
        midline_x: x index of the interhemispheric plane (world x = 0).
        class_names: the class names, in label order.
    """

    image: Tensor
    classes: Tensor
    hemisphere: Tensor
    midline_x: float
    class_names: tuple[str, ...]


def probe_task(folder: str | Path, task: str) -> str:
    """``aal`` or ``lesion``: ``task`` itself, or for ``auto`` the AAL task when ``folder`` holds its data
    (``aal.json``), else the lesion task."""
    if task != "auto":
        return task
    return "aal" if (Path(folder) / _AAL).is_file() else "lesion"


def read_aal(folder: str | Path) -> AalVolume:
    """Read ``colin27.npz`` of ``folder`` and group its AAL regions into :data:`AAL_LOBES`.

    Raises:
        FileNotFoundError: no ``aal.json`` in ``folder`` (the message gives the command that makes it).
    """
    folder = Path(folder)
    index = folder / _AAL
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder}: no Colin27/AAL data ({_AAL} missing); make it with python -m data_prep.labelled "
            f"--task aal --output {folder}"
        )
    meta = json.loads(index.read_text())
    with np.load(folder / meta["file"], allow_pickle=False) as npz:
        image = to_unit_range(npz["image"], "mr", (0.0, 1.0))
        regions = npz["regions"].astype(np.int64)
        names = [str(n) for n in npz["region_names"]]
        codes = npz["region_codes"]
        midline = float(npz["midline_x"])
    lobes = list(AAL_LOBES)
    # Lookup tables indexed by region (0 = no region): its class and its hemisphere.
    cls_of = np.full(len(names) + 1, -1, dtype=np.int64)
    side_of = np.full(len(names) + 1, -1, dtype=np.int8)
    for r, (name, code) in enumerate(zip(names, codes, strict=True), start=1):
        if int(code) // 1000 in AAL_LOBES:
            cls_of[r] = lobes.index(int(code) // 1000)
        side_of[r] = 0 if name.endswith("_L") else 1 if name.endswith("_R") else -1
    return AalVolume(
        image,
        torch.from_numpy(cls_of[regions]),
        torch.from_numpy(side_of[regions]),
        midline,
        tuple(AAL_LOBES.values()),
    )


def aal_starts(
    atlas: AalVolume, size: Sequence[int], per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the patches of :func:`aal_patches` start: ``per_class`` per class and hemisphere, each centred
    (``start + size // 2``) on a voxel of its class and hemisphere, the whole patch on that side of the
    midline plane. Deterministic for a given ``seed``.

    Returns:
        ``starts`` (N, 3) voxel corners, ``labels`` (N,) class indices, ``sides`` (N,) 0 left / 1 right;
        left hemisphere first, class by class.

    Raises:
        ValueError: a class has no position in a hemisphere where the patch fits (patch too large).
    """
    rng = np.random.default_rng([seed, 0xAA1])
    size = [int(v) for v in size]
    sx, sy, sz = size
    shape = atlas.image.shape
    mid = int(np.floor(atlas.midline_x))
    # Centre ranges [lo, hi) per axis for which the whole patch fits: left patches end at or before the
    # midline column, right patches start after it.
    x_ranges = ((sx // 2, mid - sx + sx // 2 + 1), (mid + 1 + sx // 2, shape[0] - sx + sx // 2 + 1))
    y_range, z_range = (sy // 2, shape[1] - sy + sy // 2 + 1), (sz // 2, shape[2] - sz + sz // 2 + 1)
    starts, labels, sides = [], [], []
    for side, (x0, x1) in enumerate(x_ranges):
        window = (slice(x0, x1), slice(*y_range), slice(*z_range))
        offset = np.array([x0, y_range[0], z_range[0]]) - np.array(size) // 2
        side_mask = atlas.hemisphere[window] == side
        for c, name in enumerate(atlas.class_names):
            where = torch.nonzero((atlas.classes[window] == c) & side_mask).numpy()
            if len(where) == 0:
                raise ValueError(
                    f"AAL class {name!r}: no {size} patch centred in it fits in the "
                    f"{('left', 'right')[side]} hemisphere; use a smaller patch size"
                )
            starts.append(where[rng.integers(0, len(where), per_class)] + offset)
            labels += [c] * per_class
            sides += [side] * per_class
    return np.concatenate(starts), np.array(labels), np.array(sides)


def aal_patches(atlas: AalVolume, size: Sequence[int], per_class: int, seed: int) -> Patches:
    """``per_class`` patches of ``size`` (x, y, z) per class and hemisphere (:func:`aal_starts`).

    The split is by hemisphere (``cases`` 0 = left, 1 = right): a left patch lies wholly left of the midline
    plane and a right patch wholly right of it (the midline voxel column belongs to neither), so a classifier
    trained on one hemisphere and scored on the other never sees a test voxel. Random patches of one volume
    would overlap their neighbours across the split and reward memorised texture; the hemispheres are two
    real, homologous but distinct instances of every lobe. Right-hemisphere patches are mirrored in x so that
    both hemispheres show the lobes in the same orientation (the task is anatomy, not left-right invariance).

    Returns:
        :class:`Patches` (z-normalised per patch), left hemisphere first, class by class; ``labels`` the class
        index, ``masks`` the class map + 1 of each patch (0 = none of the classes).

    Raises:
        ValueError: a class has no position in a hemisphere where the patch fits (patch too large).
    """
    starts, labels, sides = aal_starts(atlas, size, per_class, seed)
    crops = [tuple(slice(int(a), int(a) + int(s)) for a, s in zip(st, size, strict=True)) for st in starts]
    images = torch.stack([atlas.image[c] for c in crops])[:, None]
    masks = torch.stack([atlas.classes[c] + 1 for c in crops])[:, None]
    right = torch.from_numpy(sides == 1)
    images[right], masks[right] = images[right].flip(2), masks[right].flip(2)
    return Patches(normalise_patches(images), torch.from_numpy(labels), masks, torch.from_numpy(sides))
