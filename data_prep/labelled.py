"""Labelled cases for downstream tasks: real volumes with lesion masks, prepared like the shards.

Usage::

    python -m data_prep.labelled [--output .cache/labelled]

Each image of the fetched samples that has a ``*_label`` mask (the pyradiomics cases: two lung CTs, two brain
MRIs, one breast MRI) is read, reoriented to RAS+ (x, y, z) and resampled to 1 mm exactly as
``data_prep.shard`` does (the mask trilinearly, then thresholded at 0.5), its intensities stored with the
shards' policy (CT int16 HU, MRI float16 in [0, 1]). One ``<name>.npz`` per case (``image``, ``label``,
``spacing``, ``modality``; plain arrays, read with ``allow_pickle=False``) and ``cases.json`` listing them,
written last. A folder whose ``cases.json`` exists is reused as it is.

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

from data_prep.readers import load_volume
from data_prep.shard import _intensity, _modality, resample

__all__ = ["CASES_NAME", "default_output", "main", "prepare_labelled"]

CASES_NAME = "cases.json"


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
        modality, _ = _modality(image, "auto")
        volume, affine = resample(image.array, image.affine, image.spacing, spacing)
        label, _ = resample((mask.array > 0).astype(np.float32), mask.affine, mask.spacing, spacing)
        stored, _ = _intensity(volume, modality)
        label = (label >= 0.5).astype(np.uint8)
        voxel = [float(round(v, 6)) for v in np.linalg.norm(affine[:3, :3], axis=0)]
        target = output / f"{name}.npz"
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(
            tmp, image=stored, label=label, spacing=np.array(voxel), modality=np.array(modality)
        )
        tmp.replace(target)
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
    tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    tmp.replace(index)
    return index


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.labelled", description="Prepare labelled cases for fine-tuning and probes."
    )
    p.add_argument("--output", type=Path, default=None, help="folder (default: $PCRL_CACHE/labelled)")
    args = p.parse_args(argv)
    from data_prep.fetch import FetchError, fetch_samples

    try:
        index = prepare_labelled(fetch_samples(), args.output or default_output())
    except (FetchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for case in json.loads(index.read_text())["cases"]:
        print(
            f"  {case['name']:10s} {case['modality']} {case['shape']} lesion {case['lesion_voxels']} voxels"
        )
    print(f"cases: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
