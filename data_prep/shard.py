"""Volumes on disk (NIfTI, NRRD, MetaImage, DICOM) → WebDataset tar shards or a Zarr v3 store +
``manifest.jsonl`` / ``rejects.jsonl`` / ``summary.json``.

Usage::

    python -m data_prep.shard --input RAW [RAW ...] --output SHARDS [--spacing 1 1 1] [--modality auto]
        [--shard-size-mb 256] [--split train=0.9,val=0.1] [--workers N | --ray ADDRESS] [--crop-body]
        [--format webdataset|zarr] [--compression-level 1] [--exclude GLOB ...] [--max-voxels N]
        [--source NAME] [--license ID]

Each input file goes through: read (:mod:`data_prep.readers`) → canonical RAS+ → linear resampling to the
target spacing → intensity policy (CT: int16 HU clipped to [-1024, 3071]; MR: float16, percentiles
0.5/99.5 → [0, 1]) → optional body crop (:mod:`data_prep.crop`) → one sample ``<key>.image.npy.zst`` +
``<key>.meta.json`` (or one Zarr array). Every input ends as exactly one ``manifest.jsonl`` line or one
``rejects.jsonl`` line with the reason. Every volume records where it came from and its licence
(``data_source``, ``license``: ``--source`` / ``--license``, else the nearest ``SOURCE.json``, else
``unknown``; see :mod:`data_prep.provenance`), and ``summary.json`` totals them. ``qa.png``
(:mod:`data_prep.qa`) shows a sample of the accepted volumes for a check by eye.

Volumes and DICOM headers are prepared by :class:`data_prep.pool.Pool`: this process, local worker
processes, or Ray tasks. The output is byte-for-byte deterministic for any ``--workers`` and back end: inputs
are sorted, workers only prepare samples (local ones write them into ``prepared.tmp/``, see
:func:`~data_prep.prepare.prepare_volume`), and the parent puts them in input order into tars with fixed
metadata (mtime 0, uid/gid 0) or into the Zarr store. Where the time goes is in ``summary.json``
(``timings``, :mod:`data_prep.timing`).
Keys are the first 16 hex digits of the sha256 of the uncompressed ``.npy`` bytes (see
:func:`pcrl.shards.encode_volume`); two inputs with identical content are one volume (the second is rejected
as a duplicate). Files appear under temporary names and are renamed when complete; the manifest is
written last, so a folder with a manifest is a complete shard set. ``summary.json`` records a fingerprint of
the inputs and options: a re-run of the same job writes nothing, and a killed job resumes from
``journal.jsonl``, whose entries are flushed only when the shard (or batch of Zarr arrays) holding them is
complete and fsynced.

The stages live in :mod:`data_prep.discover` (finding volumes and DICOM series), :mod:`data_prep.prepare`
(one volume, in the workers) and :mod:`data_prep.writer` (shards, journal, resume, ``summary.json``); this
module holds the job and the CLI, :mod:`data_prep.options` its options.

Exit codes: 0 done, 2 usage error, 3 more rejects than ``--max-reject-fraction`` (outputs still written),
1 a local worker process died (out of memory?); completed shards are kept for the re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.discover import Discovery, InputSeries, Item, Rejected, find_inputs, list_files
from data_prep.options import DEFAULT_COMPRESSION_LEVEL, ShardOptions, parse_splits
from data_prep.pool import Pool, PoolError
from data_prep.prepare import Prepared, prepare_volume
from data_prep.provenance import Provenance, find_source_files, item_provenance
from data_prep.qa import QA_NAME, write_qa_sheet
from data_prep.qa import preload as qa_preload
from data_prep.readers import DEFAULT_MAX_VOXELS
from data_prep.timing import Stopwatch
from data_prep.writer import (
    JOURNAL_NAME,
    REJECTS_NAME,
    SUMMARY_NAME,
    Journal,
    Resume,
    ShardWriter,
    Summary,
    completed_summary,
    prepare_output,
)
from data_prep.zarr_writer import ZarrWriter
from pcrl import exit_status
from pcrl.io import write_atomic
from pcrl.shards import (
    IMAGE_SUFFIX,
    MANIFEST_KEYS,
    MANIFEST_NAME,
    META_SUFFIX,
    PROVENANCE_KEYS,
    UNKNOWN,
    provenance_totals,
)

__all__ = ["ShardOptions", "Summary", "fingerprint", "main", "shard_volumes"]

logger = logging.getLogger(__name__)


STAGING_NAME = "prepared.tmp"
"""Beside the output: what local workers prepared, until the parent moves it into a shard or the store."""

_RUN_ONLY_OPTIONS = ("workers", "ray", "progress", "overwrite", "max_reject_fraction")


def fingerprint(
    paths: Sequence[Path], opts: ShardOptions, sources: Mapping[Path, Mapping[str, str]] | None = None
) -> str:
    """Identify a job by its input files (path, size, mtime: every file :func:`~data_prep.discover.list_files`
    finds, the same set a :class:`~data_prep.discover.Discovery` accounts for), output-relevant options and
    the provenance declared in ``SOURCE.json`` files (``sources``: folder → declarations, from
    :func:`~data_prep.provenance.find_source_files`)."""
    h = hashlib.sha256()
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _RUN_ONLY_OPTIONS}
    # Added later: jobs that set none of them keep the fingerprint they had.
    for name in ("data_source", "license"):
        if options[name] is None:
            del options[name]
    if sources:
        options["source_files"] = {str(folder): dict(d) for folder, d in sources.items()}
    # 4 and 4.0 MB are the same job (the CLI gives floats, Python callers often ints).
    options["shard_size_mb"] = float(opts.shard_size_mb)
    options["spacing"] = [float(s) for s in opts.spacing]
    options["splits"] = {k: float(v) for k, v in opts.splits.items()}
    if not opts.crop_body:
        del options["crop_body"]  # added later: jobs without it keep the fingerprint they had
    if opts.compression_level == DEFAULT_COMPRESSION_LEVEL:
        del options["compression_level"]  # added later (any level reads the same): the same job as before
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    for path in sorted(paths, key=str):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("pcrl", "numpy", "torch", "nibabel", "SimpleITK", "zstandard"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _results(
    items: Sequence[Item],
    options: ShardOptions,
    pool: Pool,
    provenance: Sequence[Provenance],
    start: int = 0,
    staging: Path | None = None,
) -> Iterator[Prepared | Rejected]:
    """Prepared volumes ``start, start + 1, ...`` in input order, from the pool's workers (at most twice as
    many volumes in flight as workers: memory stays bounded by a few volumes, not by the dataset). With
    ``staging``, the workers write their results there (:func:`~data_prep.prepare.prepare_volume`)."""

    def died(args: tuple[Any, ...], reason: str) -> Rejected:
        index, item = args[:2]
        return Rejected(index, item.source, str(item.path), reason)

    where = None if staging is None else str(staging)
    tasks = ((i, items[i], options, provenance[i], where) for i in range(start, len(items)))
    yield from pool.map(prepare_volume, tasks, failed=died)


def shard_volumes(inputs: Sequence[Path], output: Path, **options: Any) -> Summary:
    """Shard volume files into ``output``. See the module docstring for the layout.

    Args:
        inputs: files and/or folders (searched recursively for NIfTI/NRRD/MetaImage files).
        output: the shard folder to create.
        **options: fields of :class:`~data_prep.options.ShardOptions`.

    Returns:
        The :class:`~data_prep.writer.Summary`; check ``summary.too_many_rejects`` (the CLI exits 3 on it).

    Raises:
        FileNotFoundError: an input does not exist or no volume file is found.
        FileExistsError: ``output`` already holds a shard set and ``overwrite`` is not set.
        ValueError: an invalid option.
    """
    opts = ShardOptions(**options)
    with Pool(opts.workers, opts.ray) as pool:
        return _run(_start(inputs, Path(output), opts, pool), pool)


@dataclass
class _Job:
    """A sharding job that :func:`_start` has checked, ready for :func:`_run`."""

    inputs: Sequence[Path]
    output: Path
    opts: ShardOptions
    found: Discovery
    resume: Resume
    fingerprint: str
    """Of the input files and options (:func:`fingerprint`): the resume check's and ``summary.json``'s."""
    sources: Mapping[Path, Mapping[str, str]]
    """The ``SOURCE.json`` declarations that apply to the inputs (folder → declarations)."""
    start_seconds: float = 0.0
    """Spent in :func:`_start` (the job's ``start`` stage)."""


def _start(inputs: Sequence[Path], output: Path, opts: ShardOptions, pool: Pool) -> _Job:
    """Everything that can fail because of the user's request, before any volume is read.

    A folder that already holds this job's complete output is recognised from the file listing alone,
    before any DICOM header is read (a no-op re-run of millions of DICOM files reads none of them).
    """
    began = time.perf_counter()
    files = list_files(inputs, opts.exclude)
    sources = find_source_files(files)  # a malformed SOURCE.json stops the job here, before any work
    job = fingerprint([f.path for f in files], opts, sources)
    if not opts.overwrite and (done := completed_summary(output, job)) is not None:
        return _Job(inputs, output, opts, Discovery([], [], []), Resume(done=done), job, sources)
    pool.start()  # there is work: the workers start while the inputs are checked
    found = find_inputs(inputs, opts.exclude, opts.series_gaps == "split", pool, files, opts.max_voxels)
    resume = prepare_output(output, opts.overwrite, job)
    return _Job(inputs, output, opts, found, resume, job, sources, time.perf_counter() - began)


def _reject_line(r: Rejected, files: int = 1, **extra: Any) -> str:
    return json.dumps({"source": r.source, "path": r.path, "reason": r.reason, "files": files, **extra})


def _take(
    result: Prepared | Rejected,
    items: Sequence[Item],
    seen: dict[str, str],
    rejects: list[str],
    journal: Journal,
) -> dict[str, Any] | None:
    """The manifest facts of a prepared volume, or ``None`` for a reject (or a duplicate of an earlier volume),
    which goes to ``rejects`` and the journal with its reason."""
    if isinstance(result, Prepared) and result.key in seen:
        result = Rejected(
            result.index, result.info["source"], str(items[result.index].path),
            f"duplicate: same voxels as {seen[result.key]} (key {result.key})",
        )  # fmt: skip
    if isinstance(result, Rejected):
        item = items[result.index]
        rejects.append(_reject_line(result, len(item.paths) if isinstance(item, InputSeries) else 1))
        journal.pending.append({"index": result.index, "reject": json.loads(rejects[-1])})
        logger.info("rejected %s: %s", result.path, result.reason)
        return None
    seen[result.key] = result.info["source"]
    info = result.info
    return {
        "key": result.key, "shape": info["shape"], "spacing": info["spacing"], "modality": info["modality"],
        "dtype": info["dtype"], "split": info["split"], "checksum": info["checksum"], "source": info["source"],
        "data_source": info["data_source"], "license": info["license"], "patient": info["patient"],
        "files": info["files"],
    }  # fmt: skip


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _place(result: Prepared, writer: ShardWriter, store: ZarrWriter | None) -> dict[str, Any]:
    """Put a prepared volume into its tar shard or the Zarr store (moving what a worker staged, or writing the
    bytes it sent); where it is, for its manifest line."""
    if store is not None:
        if result.staged:
            name, size = store.add_staged(
                result.key, Path(result.staged), result.staged_files, result.staged_bytes
            )
        else:
            assert result.zarr_files is not None
            name, size = store.add(result.key, result.zarr_files)
        return {"shard": name, "offset": 0, "size": size, "meta_offset": 0, "meta_size": 0}
    image = Path(result.staged) if result.staged else result.image
    offsets = writer.add(result.key, [(IMAGE_SUFFIX, image), (META_SUFFIX, result.meta)])
    return {
        "shard": writer.current, "offset": offsets[IMAGE_SUFFIX][0], "size": offsets[IMAGE_SUFFIX][1],
        "meta_offset": offsets[META_SUFFIX][0], "meta_size": offsets[META_SUFFIX][1],
    }  # fmt: skip


def _run(job: _Job, pool: Pool) -> Summary:
    output, opts, found, resume = job.output, job.opts, job.found, job.resume
    if resume.done is not None:
        logger.info("%s already holds this job's complete output; nothing to do", output)
        resume.done.up_to_date = True
        return resume.done
    from tqdm import tqdm

    start = time.perf_counter()
    summary = Summary(
        output=str(output.absolute()),
        inputs=len(found.items) + len(found.rejects),
        files=found.files,
        ignored=len(found.ignored),
        max_reject_fraction=opts.max_reject_fraction,
        arguments={
            "inputs": [str(p) for p in job.inputs],
            "output": str(output),
            **{
                k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(opts).items()
            },
        },
        versions=_versions(),
        fingerprint=job.fingerprint,
        resumed=resume.next_index,
    )
    items = found.items
    provenance = [item_provenance(item, job.sources, opts) for item in items]
    # Entries of the interrupted run: the same lines an uninterrupted run would have produced for them.
    manifest: list[str] = [
        # A journal of a version that recorded no provenance: its volumes are of unknown provenance.
        json.dumps({**e["manifest"], **{k: e["manifest"].get(k, UNKNOWN) for k in PROVENANCE_KEYS}})
        for e in resume.entries
        if e.get("manifest")
    ]
    rejects: list[str] = [json.dumps(e["reject"]) for e in resume.entries if e.get("reject")]
    seen: dict[str, str] = {
        e["manifest"]["key"]: e["manifest"]["source"] for e in resume.entries if e.get("manifest")
    }
    writer = ShardWriter(output, int(opts.shard_size_mb * 2**20), done=resume.shards)
    store = ZarrWriter(output) if opts.format == "zarr" else None
    journal = Journal(output / JOURNAL_NAME, summary.fingerprint, resumed=bool(resume.entries))
    # Workers on this machine write what they prepared beside the output; the parent only moves it in place.
    staging = output / STAGING_NAME if pool.parallel and pool.shares_disk else None
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    job_watch, parent, volumes = Stopwatch(), Stopwatch(), Stopwatch()
    job_watch.add("start", job.start_seconds)
    if pool.parallel and pool.backend == "processes":
        # The workers are starting (the forkserver imports torch): meanwhile, the import the QA sheet needs.
        with job_watch.time("qa_sheet"):
            qa_preload()
    job_watch.add("pool_start", pool.wait_started())
    # tqdm shows volumes/s and the ETA; the back end says where the volumes are prepared.
    bar = tqdm(total=len(items), initial=resume.next_index, unit="vol", desc=f"sharding ({pool.backend})",
               disable=not opts.progress, file=sys.stderr, smoothing=0.1)  # fmt: skip
    loop_wall, loop_cpu = time.perf_counter(), time.process_time()
    try:
        with parent.active():
            results = _results(items, opts, pool, provenance, start=resume.next_index, staging=staging)
            while True:
                with parent.time("wait"):  # for a worker (inline: preparing it here), and unpickling it
                    result = next(results, None)
                if result is None:
                    break
                bar.update(1)
                if isinstance(result, Prepared):
                    volumes.merge(result.seconds)
                with parent.time("bookkeeping"):
                    line = _take(result, items, seen, rejects, journal)
                if line is None:
                    if isinstance(result, Prepared) and result.staged:  # a duplicate: its files are not kept
                        _remove(Path(result.staged))
                    continue
                closed = writer.closed
                with parent.time("write"):
                    line = {"key": result.key, **_place(result, writer, store), **line}
                if store is not None:
                    line["format"] = "zarr"
                if writer.closed != closed:
                    # A shard was completed (and fsynced) before this volume: every earlier volume is final.
                    journal.commit()
                with parent.time("bookkeeping"):
                    assert set(MANIFEST_KEYS) <= set(line)
                    manifest.append(json.dumps(line))
                    journal.pending.append({"index": result.index, "manifest": line, "shard": line["shard"]})
                if store is not None and store.unsynced_bytes >= writer.max_bytes:
                    with parent.time("fsync"):
                        store.sync()  # a shard's worth of arrays is durable: journal them
                    journal.commit()
            writer.close()
            if store is not None:
                with parent.time("fsync"):
                    store.sync()
                store.close()
            journal.commit()
    finally:
        bar.close()
        journal.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    loop_wall, loop_cpu = time.perf_counter() - loop_wall, time.process_time() - loop_cpu
    finish = time.perf_counter()
    declared = []
    for text in manifest:
        m = json.loads(text)
        summary.accepted += 1
        summary.per_split[m["split"]] = summary.per_split.get(m["split"], 0) + 1
        summary.per_modality[m["modality"]] = summary.per_modality.get(m["modality"], 0) + 1
        declared.append((m["data_source"], m["license"], m["modality"]))
    totals = provenance_totals(declared)
    summary.per_source, summary.per_license = totals["per_source"], totals["per_license"]
    summary.sources = totals["sources"]
    summary.shards = len(writer.shards)
    summary.total_bytes = sum((output / s).stat().st_size for s in writer.shards)
    if store is not None:
        summary.total_bytes = sum(json.loads(m)["size"] for m in manifest)
    # Header-level DICOM rejects and ignored files come after the volumes, sorted, so that every file is listed.
    summary.rejected = len(rejects) + len(found.rejects)
    rejects += [_reject_line(r) for r in found.rejects]
    rejects += [_reject_line(r, ignored=True) for r in found.ignored]
    write_atomic(output / REJECTS_NAME, "".join(r + "\n" for r in rejects))
    job_watch.add("finish", time.perf_counter() - finish)
    with job_watch.time("qa_sheet"):
        try:
            summary.qa_keys = write_qa_sheet(output, [json.loads(m) for m in manifest])
            summary.qa_sheet = QA_NAME if summary.qa_keys else ""
        except Exception as e:  # a picture that cannot be drawn must not cost the finished shards
            logger.warning("could not draw the QA sheet %s: %s: %s", output / QA_NAME, type(e).__name__, e)
    summary.seconds = round(time.perf_counter() - start, 3)
    summary.timings = {
        "job": job_watch.rounded(),
        "volumes": volumes.rounded(),
        "prepared": len(manifest) - len([e for e in resume.entries if e.get("manifest")]),
        "parent": parent.rounded(),
        "parent_cpu": round(loop_cpu, 4),
        "loop": round(loop_wall, 4),
        "backend": pool.backend,
        "workers": pool.workers if pool.parallel else 1,
    }
    write_atomic(output / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n")
    write_atomic(output / MANIFEST_NAME, "".join(m + "\n" for m in manifest))  # last: marks the set complete
    (output / JOURNAL_NAME).unlink()
    return summary


# --- CLI -----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.shard",
        description="Shard NIfTI/NRRD/MetaImage volumes into WebDataset tars with a seekable manifest.",
    )
    p.add_argument("--input", nargs="+", action="extend", required=True, type=Path, metavar="PATH",
                   help="volume files or folders (searched recursively)")  # fmt: skip
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="shard folder to write")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "zarr"],
                   help="webdataset: tar shards; zarr: a Zarr v3 store with one chunked array per volume")  # fmt: skip
    p.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL, metavar="L",
                   help=f"zstd level of the samples (Zarr: of the Blosc-zstd chunks), 1 to 9 (default: "
                        f"{DEFAULT_COMPRESSION_LEVEL}); higher stores less and runs slower, any level reads the same")  # fmt: skip
    p.add_argument("--spacing", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"),
                   help="target voxel size in mm (default: 1 1 1)")  # fmt: skip
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr"],
                   help="auto: integer voxels with min <= -500 are CT, the rest MR")  # fmt: skip
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default: 256)")
    p.add_argument(
        "--split", default="train=0.9,val=0.1", help="split fractions by patient (default: train=0.9,val=0.1)"
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes preparing volumes (default: min(8, cores)); the output does not depend on it")  # fmt: skip
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="prepare volumes as Ray tasks: 'local' (a private Ray instance with --workers CPUs), 'auto' "
                        "or a cluster address (inputs must be readable on every node); same output")  # fmt: skip
    p.add_argument("--crop-body", action="store_true",
                   help="crop each volume to the box around the body (plus a margin), dropping the air around it")  # fmt: skip
    p.add_argument("--max-reject-fraction", type=float, default=0.5,
                   help="exit with code 3 when more inputs than this are rejected (default: 0.5)")  # fmt: skip
    p.add_argument("--min-size", nargs=3, type=int, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="smallest accepted shape after resampling (default: 64 64 32)")  # fmt: skip
    p.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, metavar="N",
                   help="reject a volume of more than N voxels, checked from its header before its voxels are "
                        f"read, and after resampling (default: {DEFAULT_MAX_VOXELS} = 1024^3; memory per worker "
                        "is at least 6 bytes per voxel)")  # fmt: skip
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files whose name or relative path matches (repeatable), e.g. '*_label*'")  # fmt: skip
    p.add_argument("--series-gaps", default="reject", choices=["reject", "split"],
                   help="a DICOM series with a missing slice or uneven spacing: reject it (default) or split it "
                        "into evenly spaced runs")  # fmt: skip
    p.add_argument("--take-volume", type=int, default=None, metavar="T",
                   help="keep volume T (0-based) of 4D NIfTI/NRRD/MetaImage inputs instead of rejecting them")  # fmt: skip
    p.add_argument("--salt", default="pcrl", help="salt of the patient-id hash")
    p.add_argument("--source", default=None, metavar="NAME",
                   help="the data set every input comes from, recorded per volume as data_source (default: "
                        "the nearest SOURCE.json's \"source\", else unknown)")  # fmt: skip
    p.add_argument("--license", default=None, metavar="ID",
                   help="the licence id of every input, e.g. CC-BY-4.0, recorded per volume (default: the "
                        "nearest SOURCE.json's \"license\", else unknown)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a shard set already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = {
            "spacing": tuple(args.spacing),
            "modality": args.modality,
            "shard_size_mb": args.shard_size_mb,
            "splits": parse_splits(args.split),
            "workers": args.workers,
            "ray": args.ray,
            "crop_body": args.crop_body,
            "max_reject_fraction": args.max_reject_fraction,
            "min_size": tuple(args.min_size),
            "max_voxels": args.max_voxels,
            "exclude": tuple(args.exclude),
            "salt": args.salt,
            "data_source": args.source,
            "license": args.license,
            "series_gaps": args.series_gaps,
            "take_volume": args.take_volume,
            "format": args.format,
            "compression_level": args.compression_level,
            "overwrite": args.overwrite,
            "progress": not args.no_progress,
        }
        opts = ShardOptions(**options)
    except ValueError as e:
        parser.error(str(e))  # exits 2
    with Pool(opts.workers, opts.ray) as pool:
        try:
            job = _start(args.input, args.output, opts, pool)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            parser.error(str(e))  # exits 2
        except PoolError as e:  # Ray unreachable, or a worker died reading DICOM headers
            print(f"error: {e}", file=sys.stderr)
            return exit_status.FAILED
        try:
            summary = _run(job, pool)
        except PoolError as e:
            print(f"error: {e}", file=sys.stderr)
            return exit_status.FAILED
    if summary.up_to_date:
        print(f"{args.output} is up to date: same inputs and options as its summary.json; nothing written")
    print(
        f"sharded {summary.accepted} of {summary.inputs} volumes into {summary.shards} shards "
        f"({summary.total_bytes / 2**20:.1f} MiB) in {summary.seconds:.1f} s: splits {summary.per_split}, "
        f"modalities {summary.per_modality}, {summary.rejected} rejected → {args.output}"
    )
    if summary.per_source:
        print(f"provenance: sources {summary.per_source}, licences {summary.per_license}")
    if summary.too_many_rejects:
        print(
            f"error: rejected {summary.rejected} of {summary.inputs} inputs ({summary.reject_fraction:.0%}), more than "
            f"--max-reject-fraction {summary.max_reject_fraction}; the reasons are in {args.output / REJECTS_NAME}",
            file=sys.stderr,
        )
        return exit_status.REJECTS
    return exit_status.OK


if __name__ == "__main__":
    # Run the imported module's main, so that nothing sent to worker processes is pickled as __main__.*.
    from data_prep.shard import main as _main

    sys.exit(_main())
