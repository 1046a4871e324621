"""Labelled cases for downstream tasks: real volumes with lesion masks, prepared like the shards.

Usage::

    python -m data_prep.labelled [--task lesion|aal|all] [--output .cache/labelled]

Each image of the fetched samples that has a ``*_label`` mask (the pyradiomics cases: two lung CTs, two brain
MRIs, one breast MRI) is read, reoriented to RAS+ (x, y, z) and resampled to 1 mm exactly as
``data_prep.shard`` does (the mask trilinearly, then thresholded at 0.5), its intensities stored with the
shards' policy (CT int16 HU, MRI float16 in [0, 1]). One ``<name>.npz`` per case (``image``, ``label``,
``spacing``, ``modality``; plain arrays, read with ``allow_pickle=False``) and ``cases.json`` listing them,
written last. A folder whose ``cases.json`` exists is reused as it is.

``--task aal`` (or ``all``) also prepares the Colin27 T1 with its AAL atlas (``colin27`` source of
:mod:`data_prep.fetch`: Debian's mricron-data package): ``colin27.npz`` (``image`` float16 in [0, 1] by the MR
percentile rule, ``regions`` uint8 AAL region per voxel, ``region_names``, ``region_codes`` (the atlas's own
codes, whose thousands give the lobe), ``spacing``, ``midline_x``: the x index of the plane world x = 0, the
interhemispheric plane of the MNI-aligned template) and ``aal.json``, written last. Colin27 is not in the
pretraining samples, so a probe on it is disjoint from the pretraining data (the lesion cases are not: they are
the demo's pretraining volumes).

The fine-tuning tasks and the online linear probe (:mod:`pcrl.tasks`) read these files, so ``pcrl`` needs no
medical-image readers of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from data_prep.prepare import detect_modality, intensity_policy, resample
from data_prep.readers import load_volume
from pcrl import exit_status
from pcrl.io import atomic_path, write_atomic

__all__ = ["AAL_NAME", "CASES_NAME", "default_output", "main", "prepare_aal", "prepare_labelled"]

CASES_NAME = "cases.json"
AAL_NAME = "aal.json"


def default_output() -> Path:
    """``$PCRL_CACHE/labelled`` (``PCRL_CACHE`` defaults to ``.cache``)."""
    return Path(os.environ.get("PCRL_CACHE", ".cache")) / "labelled"


def prepare_labelled(
    samples: Mapping[str, Path], output: Path, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> Path:
    """Write every image that has a ``<name>_label`` mask in ``samples`` as a labelled case.

    Args:
        samples: name → file, as :func:`data_prep.fetch.fetch_samples` returns.
        output: the folder of cases.
        spacing: target voxel size in mm.

    Returns:
        ``output / "cases.json"``.

    Raises:
        ValueError: no image with a mask, or a mask whose grid differs from its image's.
    """
    output = Path(output)
    index = output / CASES_NAME
    if index.is_file():
        return index
    names = sorted(n for n in samples if not n.endswith("_label") and f"{n}_label" in samples)
    if not names:
        raise ValueError("no image with a '<name>_label' mask among the samples")
    output.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in names:
        image, mask = load_volume(samples[name]), load_volume(samples[f"{name}_label"])
        if image.array.shape != mask.array.shape or not np.allclose(image.affine, mask.affine, atol=1e-3):
            raise ValueError(f"{samples[f'{name}_label']}: the mask's grid differs from {samples[name]}'s")
        modality, _ = detect_modality(image, "auto")
        volume, affine = resample(image.array, image.affine, image.spacing, spacing)
        label, _ = resample((mask.array > 0).astype(np.float32), mask.affine, mask.spacing, spacing)
        stored, _ = intensity_policy(volume, modality)
        label = (label >= 0.5).astype(np.uint8)
        voxel = [float(round(v, 6)) for v in np.linalg.norm(affine[:3, :3], axis=0)]
        target = output / f"{name}.npz"
        with atomic_path(target) as tmp, tmp.open("wb") as f:
            np.savez_compressed(
                f, image=stored, label=label, spacing=np.array(voxel), modality=np.array(modality)
            )
        cases.append(
            {
                "name": name,
                "file": target.name,
                "modality": modality,
                "shape": list(stored.shape),
                "spacing": voxel,
                "lesion_voxels": int(label.sum()),
                "source": samples[name].name,
            }
        )
    write_atomic(index, json.dumps({"cases": cases}, indent=1) + "\n")
    return index


def _region_table(path: Path) -> tuple[list[str], list[int]]:
    """Names and codes of the AAL regions 1..N from the atlas's ``index name code`` text table."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not rows or any(len(r) != 3 or not r[0].isdigit() or not r[2].isdigit() for r in rows):
        raise ValueError(f"{path}: expected lines 'index name code' (the AAL region table)")
    if [int(r[0]) for r in rows] != list(range(1, len(rows) + 1)):
        raise ValueError(f"{path}: region indices must run 1..{len(rows)}")
    return [r[1] for r in rows], [int(r[2]) for r in rows]


def prepare_aal(files: Mapping[str, Path], output: Path) -> Path:
    """Write the Colin27 T1 and its AAL regions as ``colin27.npz`` and ``aal.json`` in ``output``.

    Args:
        files: the ``colin27`` source of :func:`data_prep.fetch.fetch_samples` (``colin27_ch2``,
            ``colin27_aal``, ``colin27_aal_txt``).
        output: the folder (shared with the lesion cases; its own index, so each part is made once).

    Returns:
        ``output / "aal.json"``.

    Raises:
        ValueError: a file is missing, the atlas is not on the T1's 1 mm grid, or its table is malformed.
    """
    output = Path(output)
    index = output / AAL_NAME
    if index.is_file():
        return index
    missing = [k for k in ("colin27_ch2", "colin27_aal", "colin27_aal_txt") if k not in files]
    if missing:
        raise ValueError(f"missing {missing}: fetch them with python -m data_prep.fetch --source colin27")
    image, atlas = load_volume(files["colin27_ch2"]), load_volume(files["colin27_aal"])
    if image.array.shape != atlas.array.shape or not np.allclose(image.affine, atlas.affine, atol=1e-3):
        raise ValueError(f"{files['colin27_aal']}: the atlas's grid differs from {files['colin27_ch2']}'s")
    # Region labels cannot be interpolated; both files are 1 mm already, which is all this needs.
    if not np.allclose(image.spacing, 1.0, atol=1e-3):
        raise ValueError(f"{files['colin27_ch2']}: expected 1 mm voxels, got {list(image.spacing)}")
    names, codes = _region_table(files["colin27_aal_txt"])
    regions = np.rint(atlas.array).astype(np.int64)
    if regions.min() < 0 or regions.max() > len(names):
        raise ValueError(f"{files['colin27_aal']}: labels outside 0..{len(names)} of its table")
    stored, _ = intensity_policy(image.array.astype(np.float32), "mr")
    # load_volume gives RAS+ (x, y, z) with 1 mm diagonal axes; world x = 0 is the MNI midline.
    midline = float(-image.affine[0, 3] / image.affine[0, 0])
    output.mkdir(parents=True, exist_ok=True)
    target = output / "colin27.npz"
    with atomic_path(target) as tmp, tmp.open("wb") as f:
        np.savez_compressed(
            f,
            image=stored,
            regions=regions.astype(np.uint8),
            region_names=np.array(names),
            region_codes=np.array(codes, dtype=np.int64),
            spacing=np.array([float(v) for v in image.spacing]),
            midline_x=np.array(midline),
        )
    meta = {
        "name": "colin27",
        "file": target.name,
        "modality": "mr",
        "shape": list(stored.shape),
        "regions": len(names),
        "midline_x": midline,
        "source": [files[k].name for k in ("colin27_ch2", "colin27_aal", "colin27_aal_txt")],
    }
    write_atomic(index, json.dumps(meta, indent=1) + "\n")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.labelled", description="Prepare labelled cases for fine-tuning and probes."
    )
    p.add_argument("--output", type=Path, default=None, help="folder (default: $PCRL_CACHE/labelled)")
    p.add_argument(
        "--task",
        choices=("lesion", "aal", "all"),
        default="lesion",
        help="lesion: the pyradiomics lesion cases; aal: Colin27 + AAL atlas (apt-get download, 16 MB); all",
    )
    args = p.parse_args(argv)
    from data_prep.fetch import FetchError, fetch_samples

    output = args.output or default_output()
    try:
        if args.task in ("lesion", "all"):
            index = prepare_labelled(fetch_samples(), output)
            for case in json.loads(index.read_text())["cases"]:
                print(
                    f"  {case['name']:10s} {case['modality']} {case['shape']} lesion {case['lesion_voxels']} "
                    "voxels"
                )
            print(f"cases: {index}")
        if args.task in ("aal", "all"):
            index = prepare_aal(fetch_samples(sources=["colin27"]), output)
            meta = json.loads(index.read_text())
            print(f"  colin27    mr {meta['shape']} AAL {meta['regions']} regions")
            print(f"atlas: {index}")
    except (FetchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_status.FAILED
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
