"""pcrl.shards and pcrl.data on real shards: manifests, seek reads, windowing, the deterministic rank/worker
split, resume, derived seeds and the fixed views."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_prep.readers import load_volume
from data_prep.shard import shard_volumes
from pcrl.config import DataConfig, PretrainConfig, RunConfig, TrainConfig, ViewsConfig
from pcrl.data import VolumeStream, build_loader, derive_seed, fixed_views
from pcrl.shards import SampleRecord, decode_volume, read_manifest, read_volume, to_unit_range
from pcrl.views import PCRLv2Views

GLOBAL = (16, 16, 8)
LOCAL = (8, 8, 8)


def _views_cfg(**kw) -> ViewsConfig:
    """A small view recipe for the crops of ``crop_shards``: views of GLOBAL and LOCAL voxels."""
    return ViewsConfig(
        global_size=GLOBAL,
        local_size=LOCAL,
        global_crop_sizes=[[24, 24, 12], [16, 16, 8]],
        local_crop_sizes=[[8, 8, 8], [4, 4, 4]],
        border=(2, 2, 1),
        swap_patch=(4, 2, 2),
        swap_count=10,
        **kw,
    )


class CropViews:
    """A test transform for :class:`VolumeStream` (which calls ``PCRLv2Views.draw`` in training): seeded random
    crops, plus the seed and threshold it was called with (so tests can check them). Picklable, for loader
    workers."""

    def __init__(self, num_locals: int = 2) -> None:
        self.num_locals = num_locals

    @staticmethod
    def _crop(volume: torch.Tensor, size: tuple[int, int, int], g: torch.Generator) -> torch.Tensor:
        starts = [
            int(torch.randint(0, n - s + 1, (1,), generator=g))
            for n, s in zip(volume.shape, size, strict=True)
        ]
        x, y, z = starts
        return volume[x : x + size[0], y : y + size[1], z : z + size[2]][None].clone()

    def __call__(
        self, volume: torch.Tensor, seed: int, tissue_threshold: float | None
    ) -> dict[str, torch.Tensor]:
        assert volume.dtype == torch.float32 and volume.ndim == 3
        g = torch.Generator().manual_seed(seed)
        views = torch.stack([self._crop(volume, GLOBAL, g) for _ in range(2)])
        return {
            "global_views": views,
            "global_targets": views.clone(),
            "local_views": torch.stack([self._crop(volume, LOCAL, g) for _ in range(self.num_locals)]),
            "seed": torch.tensor(seed, dtype=torch.int64),
            "threshold": torch.tensor(math.nan if tissue_threshold is None else tissue_threshold),
            "range": torch.stack([volume.min(), volume.max()]),
        }


@pytest.fixture(scope="module")
def crop_shards(sample_volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten distinct real crops (5 CT from lung1, 5 MRI from brain1), one patient each, sharded at native
    spacing into 1 MB shards: enough volumes to split over 2 ranks × 2 workers with a remainder."""
    root = tmp_path_factory.mktemp("crops_raw")
    for name, modality in (("lung1", "ct"), ("brain1", "mr")):
        raw = load_volume(sample_volumes[name])
        for i in range(5):
            x0, y0 = 60 + 17 * i, 70 + 11 * i
            crop = np.ascontiguousarray(raw.array[x0 : x0 + 48, y0 : y0 + 40, 2:22])
            affine = raw.affine.copy()
            affine[:3, 3] = (raw.affine @ [x0, y0, 2, 1])[:3]
            (root / f"{name}_{i}").mkdir()
            nib.save(nib.Nifti1Image(crop, affine), str(root / f"{name}_{i}" / f"{modality}.nii.gz"))
    out = tmp_path_factory.mktemp("crop_shards")
    spacing = tuple(load_volume(sample_volumes["lung1"]).spacing)
    shard_volumes([root], out, spacing=(spacing[0], spacing[1], 5.0), splits={"train": 1.0}, min_size=(16, 16, 8),
                  shard_size_mb=1, modality="auto", progress=False)  # fmt: skip
    return out


def _stream(records: list[SampleRecord], rank: int = 0, world_size: int = 1, **kw) -> VolumeStream:
    kw.setdefault("seed", 7)
    kw.setdefault("ct_window", (-1000.0, 1000.0))
    return VolumeStream(records, CropViews(), rank=rank, world_size=world_size, **kw)


# --- manifest ------------------------------------------------------------------------------------------


def test_read_manifest_accepts_folder_file_glob_and_braces(sample_shards: Path, crop_shards: Path) -> None:
    """A shard folder, its manifest file, a glob and a brace pattern all find the same records, with
    absolute shard paths; two folders through a brace pattern are concatenated in pattern order."""
    by_folder = read_manifest(sample_shards)
    assert len(by_folder) == 4 and all(r.shard.is_absolute() and r.shard.is_file() for r in by_folder)
    assert read_manifest(sample_shards / "manifest.jsonl") == by_folder
    assert read_manifest(str(sample_shards.parent / (sample_shards.name[:-1] + "*"))) == by_folder
    both = read_manifest(f"{{{sample_shards},{crop_shards}}}", split="all")
    assert [r.key for r in both] == [r.key for r in by_folder] + [r.key for r in read_manifest(crop_shards)]
    # The same folder twice (two patterns reaching it) is read once.
    assert read_manifest(f"{{{sample_shards},{sample_shards}/manifest.jsonl}}") == by_folder


def test_read_manifest_errors_name_the_path(sample_shards: Path, tmp_path: Path) -> None:
    """Missing folders, folders without a manifest, malformed lines and empty splits raise errors that name
    the path and say what to do."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no shard folder or manifest matches"):
        read_manifest(str(tmp_path / "nope*"))
    with pytest.raises(FileNotFoundError, match=r"has no manifest\.jsonl"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"data\.shards is empty"):
        read_manifest("")
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (sample_shards / "manifest.jsonl").read_text().splitlines()
    (bad / "manifest.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad/manifest.jsonl:2: malformed manifest line"):
        read_manifest(bad)
    line = json.loads(lines[0])
    del line["offset"]
    (bad / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=r":1: malformed manifest line: missing keys \['offset'\]"):
        read_manifest(bad)
    with pytest.raises(ValueError, match=r"no volumes with split 'val' .*splits present: \{'train': 4\}"):
        read_manifest(sample_shards, split="val")
    with pytest.raises(ValueError, match="unknown split"):
        read_manifest(sample_shards, split="training")


# --- reading -------------------------------------------------------------------------------------------


def test_read_volume_round_trips_the_stored_array(sample_shards: Path) -> None:
    """A seek read returns the same array as decoding the member extracted with tarfile, with the record's
    shape and dtype; checksum verification passes, and a wrong checksum or offset is a clear error."""
    import tarfile

    for rec in read_manifest(sample_shards):
        array, meta = read_volume(rec, verify=True)
        with tarfile.open(rec.shard) as tar:
            member = tar.extractfile(f"{rec.key}.image.npy.zst").read()  # type: ignore[union-attr]
        np.testing.assert_array_equal(array, decode_volume(member))
        assert array.shape == rec.shape and str(array.dtype) == rec.dtype and meta["key"] == rec.key
    rec = read_manifest(sample_shards)[0]
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_volume(dataclasses.replace(rec, checksum="sha256:00"), verify=True)
    with pytest.raises(ValueError, match="truncated"):
        read_volume(dataclasses.replace(rec, offset=rec.shard.stat().st_size - 10))
    with pytest.raises(ValueError, match="cannot decode"):
        read_volume(dataclasses.replace(rec, offset=rec.offset + 512))


def test_to_unit_range_windows_ct_and_passes_mr() -> None:
    """CT HU map linearly through the window and clip; MR values stay (clipped to [0, 1]); float32 out."""
    ct = np.array([[[-1024, -1000, 0, 500, 1000, 3071]]], dtype=np.int16)
    out = to_unit_range(ct, "ct", (-1000.0, 1000.0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]]]))
    torch.testing.assert_close(
        to_unit_range(ct, "ct", (-1024.0, 3071.0))[0, 0, [0, -1]], torch.tensor([0.0, 1.0])
    )
    mr = np.array([[[0.0, 0.25, 1.0]]], dtype=np.float16)
    torch.testing.assert_close(to_unit_range(mr, "mr", (-1000.0, 1000.0)), torch.tensor([[[0.0, 0.25, 1.0]]]))
    with pytest.raises(ValueError, match="unknown modality"):
        to_unit_range(mr, "pet", (-1000.0, 1000.0))


# --- the stream ----------------------------------------------------------------------------------------


def _take(stream: VolumeStream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_yields_views_with_thresholds_and_unit_range(sample_shards: Path) -> None:
    """One consumer over the real sample set: every volume once per epoch, views in [0, 1], the tissue
    threshold in window units for CT ((-150 + 1000) / 2000) and None for MRI."""
    records = read_manifest(sample_shards)
    samples = _take(_stream(records), 8)
    modality = {r.key: r.modality for r in records}
    assert sorted(s["key"] for s in samples[:4]) == sorted(r.key for r in records)
    assert sorted(s["key"] for s in samples[4:]) == sorted(r.key for r in records)
    assert [s["key"] for s in samples[:4]] != [s["key"] for s in samples[4:]]  # reshuffled per epoch
    for s in samples:
        assert s["global_views"].shape == (2, 1, *GLOBAL) and s["local_views"].shape == (2, 1, *LOCAL)
        lo, hi = s["range"].tolist()
        assert 0.0 <= lo < hi <= 1.0
        if modality[s["key"]] == "ct":
            assert s["threshold"].item() == pytest.approx(0.425)
        else:
            assert math.isnan(s["threshold"].item())
    assert all(
        math.isnan(s["threshold"].item()) for s in _take(_stream(records, tissue_threshold_hu=None), 4)
    )


def test_stream_ranks_partition_each_epoch_and_drop_the_remainder(crop_shards: Path) -> None:
    """Ranks 0..2 of 3 see disjoint volumes each epoch, the same count each (10 // 3 = 3, one dropped),
    and the union is what epoch_indices promises; a second run repeats it exactly."""
    records = read_manifest(crop_shards)
    assert len(records) == 10
    runs = []
    for _ in range(2):
        per_rank = [_take(_stream(records, rank=r, world_size=3), 6) for r in range(3)]
        runs.append([[(s["key"], int(s["seed"])) for s in samples] for samples in per_rank])
    assert runs[0] == runs[1]
    for epoch in (0, 1):
        keys = [[k for k, _ in rank[3 * epoch : 3 * epoch + 3]] for rank in runs[0]]
        flat = [k for ks in keys for k in ks]
        assert len(flat) == len(set(flat)) == 9
        stream = _stream(records, world_size=3)
        expected = [records[i].key for c in range(3) for _, i in stream.epoch_indices(epoch, c, 3)]
        assert flat == expected
    assert [k for k, _ in runs[0][0][:3]] != [k for k, _ in runs[0][0][3:]]


def test_stream_pairs_share_a_volume_with_distinct_seeds(crop_shards: Path) -> None:
    """pairs_per_volume=2 renders two samples from each decoded volume with different seeds."""
    samples = _take(_stream(read_manifest(crop_shards), pairs_per_volume=2), 6)
    for a, b in zip(samples[::2], samples[1::2], strict=True):
        assert a["key"] == b["key"] and int(a["seed"]) != int(b["seed"])
    assert len({s["key"] for s in samples}) == 3


@pytest.mark.parametrize(("pairs", "at"), [(1, (1, 2, 0)), (2, (0, 3, 1))])
def test_stream_resumes_from_its_loader_state(
    crop_shards: Path, pairs: int, at: tuple[int, int, int]
) -> None:
    """A stream read without a DataLoader is a loader without workers: after k samples its loader_state says
    where it stands (epoch, volumes done in it, next pair), a stream built with start_batches=k continues the
    exact same sequence (mid-volume too), and a state from another shard set is refused."""
    records = read_manifest(crop_shards)
    kw = {"rank": 1, "world_size": 2, "pairs_per_volume": pairs}
    full = [(s["key"], int(s["seed"])) for s in _take(_stream(records, **kw), 12)]
    state = _stream(records, **kw).loader_state(7, num_workers=0)
    (worker,) = state["workers"]
    assert (worker["epoch"], worker["cursor"], worker["pair"]) == at  # 5 volumes per epoch per rank
    resumed = _stream(records, start_batches=state["batches"], **kw)
    resumed.check_loader_state(state, 0)
    assert [(s["key"], int(s["seed"])) for s in _take(resumed, 5)] == full[7:]
    other = _stream(records[:-1], start_batches=7, **kw)
    with pytest.raises(ValueError, match=r"the number of volumes in data\.shards \(data\.split\) was 10"):
        other.check_loader_state(state, 0)


def _loader_run(records: list[SampleRecord], rank: int, n_batches: int) -> list[tuple[str, int]]:
    stream = _stream(records, rank=rank, world_size=2)
    # batch_size=None: every sample is a batch of its own, still taken from the workers round-robin
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    out: list[tuple[str, int]] = []
    for i, sample in enumerate(loader):
        out.append((sample["key"], int(sample["seed"])))
        if i + 1 == n_batches:
            break
    return out


def test_loader_two_ranks_two_workers_split_disjointly_and_deterministically(crop_shards: Path) -> None:
    """2 ranks × 2 real DataLoader workers = 4 consumers of 2 volumes each per epoch (10 // 4, two dropped):
    no volume is seen twice in an epoch, every consumer does the same work, and a rerun is identical."""
    records = read_manifest(crop_shards)
    # Batches alternate worker 0, 1, 0, 1, ...: the first 4 of a rank are both workers' epoch 0.
    first = {rank: _loader_run(records, rank, 8) for rank in (0, 1)}
    assert first == {rank: _loader_run(records, rank, 8) for rank in (0, 1)}
    for epoch in (0, 1):
        keys = [k for rank in (0, 1) for k, _ in first[rank][4 * epoch : 4 * epoch + 4]]
        assert len(keys) == len(set(keys)) == 8
    # Worker w of rank r is consumer 2r + w; its samples are batches w, w + 2, ...
    stream = _stream(records, world_size=2)
    for rank in (0, 1):
        for worker in (0, 1):
            expected = [
                records[i].key for e in (0, 1) for _, i in stream.epoch_indices(e, 2 * rank + worker, 4)
            ]
            assert [k for k, _ in first[rank][worker::2]] == expected
    seeds = Counter(s for rank in (0, 1) for _, s in first[rank])
    assert max(seeds.values()) == 1


def test_loader_with_too_few_volumes_says_what_to_change(sample_shards: Path) -> None:
    """Fewer volumes than consumers (ranks × workers) cannot give every consumer a volume: a ValueError that
    says what to change, from build_loader before any worker starts and from the stream itself."""
    records = read_manifest(sample_shards)
    stream = _stream(records, world_size=2)
    with pytest.raises(
        ValueError, match=r"4 volumes but world_size×num_workers = 2×3 = 6 consumers; lower data.num_workers"
    ):
        stream.check_consumers(3)
    # Iterating checks too (a DataLoader re-raises it from its workers; not exercised here because torch then
    # waits 5 s per worker at shutdown).
    with pytest.raises(ValueError, match=r"1 volumes but world_size×num_workers = 2×1 = 2 consumers"):
        next(iter(_stream(records[:1], world_size=2)))
    cfg = PretrainConfig(data=DataConfig(shards=str(sample_shards), num_workers=3))
    with pytest.raises(ValueError, match="4 volumes but world_size×num_workers = 2×3"):
        build_loader(cfg, PCRLv2Views(cfg.views), rank=0, world_size=2)
    with pytest.raises(TypeError, match=r"renders with a pcrl\.views\.PCRLv2Views, got CropViews"):
        build_loader(cfg, CropViews(), rank=0, world_size=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_build_loader_batches_views_from_the_config(sample_shards: Path, num_workers: int) -> None:
    """build_loader reads data.shards/split and batches train.micro_batch_size rendered samples: views
    stacked to (B, 2, 1, X, Y, Z) and (B, L, 1, x, y, z), keys as a list of strings."""
    cfg = PretrainConfig(
        run=RunConfig(seed=3),
        data=DataConfig(shards=str(sample_shards), split="all", num_workers=num_workers, prefetch_factor=1),
        views=_views_cfg(),
        train=TrainConfig(micro_batch_size=2),
    )
    batches = _batches(build_loader(cfg, PCRLv2Views(cfg.views), rank=0, world_size=1), 2)
    for batch in batches:
        assert batch["global_views"].shape == (2, 2, 1, *GLOBAL)
        assert batch["global_targets"].shape == (2, 2, 1, *GLOBAL)
        assert batch["local_views"].shape == (2, cfg.views.num_locals, 1, *LOCAL)
        assert isinstance(batch["keys"], list) and all(isinstance(k, str) for k in batch["keys"])
    keys = [k for b in batches for k in b["keys"]]
    assert len(set(keys)) == 4


def _batches(loader: Iterable[dict], n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_build_loader_resumes_mid_epoch_exactly(crop_shards: Path, num_workers: int) -> None:
    """A loader built with start_batches=N yields bit-identical batches to what an uninterrupted loader yields
    after N batches (workers draw, a whole batch is rendered at once): the bug it pins is a resumed run that
    trains on other samples (restarted workers, a worker order shifted by one, a volume's remaining pairs
    skipped), which breaks bit-exact resume. Rank 1 of 2, three pairs per volume and batches of 2, so resume
    points fall inside volumes, epochs and worker turns. The checkpoint's record of the position
    (loader_state) is exactly where the resumed loader stands, and a changed setting is named."""
    cfg = PretrainConfig(
        run=RunConfig(seed=5),
        data=DataConfig(shards=str(crop_shards), num_workers=num_workers, prefetch_factor=1),
        views=_views_cfg(pairs_per_volume=3),
        train=TrainConfig(micro_batch_size=2),
    )
    views = PCRLv2Views(cfg.views)
    full = _batches(build_loader(cfg, views, rank=1, world_size=2), 9)
    assert full[0]["global_views"].shape == (2, 2, 1, *GLOBAL)
    # every sample rendered once: 18 distinct samples (each seed's noise makes its views unique)
    assert len({v.numpy().tobytes() for batch in full for v in batch["global_views"]}) == 18
    for start in (1, 3, 4, 5):
        resumed = build_loader(cfg, views, rank=1, world_size=2, start_batches=start)
        for a, b in zip(full[start:], _batches(resumed, 9 - start), strict=True):
            assert a["keys"] == b["keys"], start
            for k in ("global_views", "global_targets", "local_views"):
                assert torch.equal(a[k], b[k]), (start, k)
        stream = resumed.dataset
        state = stream.loader_state(start, num_workers)
        stream.check_loader_state(state, num_workers)
        assert sum(w["samples"] for w in state["workers"]) == 2 * start
    with pytest.raises(ValueError, match=r"data\.num_workers was 3 .* and is"):
        stream.check_loader_state({**state, "num_workers": 3}, num_workers)


# --- seeds and fixed views -----------------------------------------------------------------------------


def test_derive_seed_is_the_seed_sequence_recipe() -> None:
    """Pins the seeds that stored runs depend on (the samples a resumed run trains on, the evaluation views,
    the panel): derive_seed(*keys) is the first 64-bit word of SeedSequence(keys) shifted right by one bit."""
    assert derive_seed(0, 0, 0, 0) == 7896617691693857887  # sample (seed 0, epoch 0, position 0, pair 0)
    assert derive_seed(0, 0, 0, 1) == 8407437806151696170
    assert derive_seed(0, 0, 0x10AD) == 6742162137859861752  # the DataLoader generator of (seed 0, rank 0)
    assert derive_seed(0, 0xE7A1, 0, 0) == 7529308171022261468  # first evaluation view of eval.seed 0
    assert derive_seed(0, 0x9A7E1, 0) == 9090269859332713259  # first panel view of run.seed 0
    for keys in [(7, 3, 9, 1), (2**40, 0), (123456789, 7, 0x10AD)]:
        word = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
        assert derive_seed(*keys) == int(word >> np.uint64(1)) < 2**63


def test_fixed_views_render_each_sample_from_its_keys(
    crop_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fixed_views renders views(volume in [0, 1], derive_seed(*keys), tissue threshold) for each (record, keys)
    in order, as the loader would; each volume is read once however many samples it serves."""
    import pcrl.data

    cfg = PretrainConfig(
        data=DataConfig(shards=str(crop_shards), ct_window=(-1000.0, 1000.0)), views=_views_cfg()
    )
    records = read_manifest(crop_shards)
    ct = next(r for r in records if r.modality == "ct")
    mr = next(r for r in records if r.modality == "mr")
    samples = [(ct, (1, 0)), (mr, (1, 1)), (ct, (1, 2))]
    reads = Counter()

    def counting_read(record: SampleRecord, verify: bool = False):  # type: ignore[no-untyped-def]
        reads[record.key] += 1
        return read_volume(record, verify)

    monkeypatch.setattr(pcrl.data, "read_volume", counting_read)
    views = PCRLv2Views(cfg.views)
    got = list(fixed_views(cfg, views, samples))
    assert [r for r, _ in got] == [ct, mr, ct] and reads == {ct.key: 1, mr.key: 1}
    for (record, keys), (_, sample) in zip(samples, got, strict=True):
        volume = to_unit_range(read_volume(record)[0], record.modality, cfg.data.ct_window)
        threshold = 0.425 if record.modality == "ct" else None  # (-150 + 1000) / 2000
        expected = views(volume, seed=derive_seed(*keys), tissue_threshold=threshold)
        for k in ("global_views", "global_targets", "local_views"):
            assert torch.equal(sample[k], expected[k]), (record.key, k)
