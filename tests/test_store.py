"""The image store: decoded images kept content-addressed in memory-mapped shards, so a run decodes only new content,
reads rows as views (no dataset-sized copy, also when a file fails), hashes a file again only when its size or mtime
changed, survives a killed writer and two processes decoding the same data, and reaches DataLoader workers as a
small slot table."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import write_class_folders

from affinage import data
from affinage.data import LabelledImages, PixelDataset, Preprocessing, Sample, decode_all, load_source
from affinage.store import ROWS_PER_SHARD, ImageRows, ImageStore

PP = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0, "center")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of this test's own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(folder))
    return folder


def settle(root: Path) -> None:
    """Date every file an hour back: hashes are memoised only for files not modified in the last seconds."""
    past = time.time() - 3600
    for p in root.rglob("*"):
        os.utime(p, (past, past))


def count_calls(monkeypatch, module, name: str) -> list[str]:
    """Record the first argument of every call to module.name (still calling it)."""
    calls: list = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def counting_reads(images: LabelledImages) -> list[str]:
    """Make `images` record the key of every file whose bytes are read."""
    reads: list[str] = []
    real = images.read_bytes

    def read(sample: Sample) -> bytes:
        reads.append(sample.key)
        return real(sample)

    images.read_bytes = read
    return reads


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = write_class_folders(tmp_path / "data", per_class=8, classes=("a", "b"))
    settle(root)
    return root


def reference_pixels(images: LabelledImages, pp: Preprocessing = PP) -> dict[str, np.ndarray]:
    return {s.key: data.load_pixels(Path(s.key).read_bytes(), pp) for s in images.samples}


# ----------------------------------------------------------------------------------------------
# Work proportional to what changed
# ----------------------------------------------------------------------------------------------
def test_adding_an_image_decodes_only_that_one(cache, folder, monkeypatch):
    first = decode_all(load_source(str(folder)), PP, progress=False)
    assert not first.cache_hit and first.decoded_count == 16
    shutil.copy(folder / "a" / "a_01.jpg", folder / "a" / "dup_of_a_01.jpg")  # same content: no decode at all
    write_class_folders(folder / "new", per_class=1, classes=("b",), seed=7)
    new_file = next((folder / "new" / "b").iterdir())
    new_file.rename(folder / "b" / "b_new.png")
    settle(folder)

    decodes = count_calls(monkeypatch, data, "load_pixels")
    images = load_source(str(folder))
    second = decode_all(images, PP, progress=False)
    assert len(decodes) == 1 and second.decoded_count == 1 and not second.cache_hit
    assert len(second.samples) == 18
    expected = reference_pixels(images)
    for i, s in enumerate(second.samples):
        assert np.array_equal(second.pixels[i], expected[s.key]), s.key
    dup, orig = (second.samples.index(next(s for s in second.samples if s.key.endswith(n)))
                 for n in ("dup_of_a_01.jpg", "a_01.jpg"))
    assert second.pixels.slots[dup] == second.pixels.slots[orig]  # one row per content


def test_rerun_reads_no_byte_of_unchanged_files(cache, folder):
    decode_all(load_source(str(folder)), PP, progress=False)
    images = load_source(str(folder))
    reads = counting_reads(images)
    again = decode_all(images, PP, progress=False)
    assert reads == [] and again.hashed_count == 0 and again.cache_hit

    # a changed mtime (same bytes): hashed again, not decoded again; a changed file: both
    touched, changed = folder / "a" / "a_00.png", folder / "b" / "b_03.jpg"
    os.utime(touched, (time.time() - 60, time.time() - 60))
    changed.write_bytes((folder / "a" / "a_05.jpg").read_bytes())  # other content, same name
    os.utime(changed, (time.time() - 60, time.time() - 60))
    images = load_source(str(folder))
    reads = counting_reads(images)
    third = decode_all(images, PP, progress=False)
    assert sorted(reads) == sorted([str(touched), str(changed)])  # hashed; the changed one is in the store already
    assert third.decoded_count == 0
    row = third.samples.index(next(s for s in third.samples if s.key == str(changed)))
    assert np.array_equal(third.pixels[row], data.load_pixels(changed.read_bytes(), PP))


def test_a_file_modified_just_now_is_hashed_again(cache, folder):
    fresh = folder / "a" / "a_02.png"
    fresh.write_bytes(fresh.read_bytes())  # mtime = now: its size and mtime could hide a change in the same tick
    decode_all(load_source(str(folder)), PP, progress=False)
    images = load_source(str(folder))
    reads = counting_reads(images)
    decode_all(images, PP, progress=False)
    assert reads == [str(fresh)]


def test_in_memory_sources_are_hashed_from_their_bytes(cache, tiny_images):
    files = sorted(tiny_images.rglob("*.png"))[:6]
    blobs = [p.read_bytes() for p in files]
    images = LabelledImages([Sample(f"mem/{i}", p.parent.name) for i, p in enumerate(files)], "in memory",
                            lambda s: blobs[int(s.key.split("/")[1])])
    first = decode_all(images, PP, progress=False)
    blobs[0] = files[1].read_bytes()  # same key, other content: must not be served from a memo
    reads = counting_reads(images)
    second = decode_all(images, PP, progress=False)
    assert len(reads) == 6 and second.hashes[0] == first.hashes[1]


def test_failed_decodes_are_remembered_not_retried(cache, folder, monkeypatch):
    (folder / "a" / "broken.jpg").write_bytes((folder / "a" / "a_01.jpg").read_bytes()[:150])
    settle(folder)
    first = decode_all(load_source(str(folder)), PP, progress=False)
    reason = dict(first.skipped)[str(folder / "a" / "broken.jpg")]
    assert "truncated" in reason or "cannot decode" in reason
    decodes = count_calls(monkeypatch, data, "load_pixels")
    second = decode_all(load_source(str(folder)), PP, progress=False)
    assert decodes == [] and second.cache_hit and dict(second.skipped)[str(folder / "a" / "broken.jpg")] == reason
    # another decoder (a Pillow upgrade may read it): tried again
    monkeypatch.setattr(data, "_decoder_version", lambda: "pillow-99")
    third = decode_all(load_source(str(folder)), PP, progress=False)
    assert len(decodes) == 1 and third.decoded_count == 1


# ----------------------------------------------------------------------------------------------
# Views, never copies
# ----------------------------------------------------------------------------------------------
def test_a_failed_file_or_a_cache_hit_copies_no_pixels(cache, tmp_path):
    root = write_class_folders(tmp_path / "many", per_class=100, classes=("a", "b"))
    (root / "a" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    settle(root)
    pp = Preprocessing(64, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0, "center")  # 200 x 12 KiB = 2.4 MiB of pixels
    decode_all(load_source(str(root)), pp, progress=False, workers=1)
    images = load_source(str(root))
    tracemalloc.start()
    try:
        again = decode_all(images, pp, progress=False, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert again.cache_hit and len(again.samples) == 200 and len(again.skipped) == 1
    assert peak < 1.2 * 2**20, f"{peak / 2**20:.1f} MiB allocated for 2.3 MiB of pixels: a copy"
    row = again.pixels[0]
    assert not row.flags.writeable and not row.flags.owndata  # a view into the memory-mapped shard


def test_image_rows_index_like_an_array(cache, folder):
    decoded = decode_all(load_source(str(folder)), PP, progress=False)
    rows = decoded.pixels
    full = np.array(rows)
    assert full.shape == rows.shape == (16, 3, 16, 16) and full.dtype == rows.dtype == np.uint8 and len(rows) == 16
    assert np.array_equal(rows[-1], full[-1]) and np.array_equal(rows[np.int64(3)], full[3])
    assert np.array_equal(rows[2:9:3], full[2:9:3]) and np.array_equal(rows[[5, 0, 5]], full[[5, 0, 5]])
    mask = np.arange(16) % 4 == 0
    assert np.array_equal(rows[mask], full[mask]) and np.array_equal(rows.take([1, 2]), full[[1, 2]])
    assert np.array_equal(np.array(rows.subset([4, 1])), full[[4, 1]])
    assert all(np.array_equal(a, b) for a, b in zip(rows, full))
    with pytest.raises(IndexError):
        rows[16]
    with pytest.raises(TypeError, match="one index"):
        rows[0, 1]


def test_rows_pickle_as_a_slot_table_and_reopen_lazily(cache, folder):
    decoded = decode_all(load_source(str(folder)), PP, progress=False)
    rows = decoded.pixels
    rows[0]  # opens a shard in this process
    blob = pickle.dumps(rows)
    assert len(blob) < 1000 + 8 * len(rows)  # folder + slots; 16 rows of pixels would be 12 KiB
    copy = pickle.loads(blob)
    assert copy._shards == {}
    assert np.array_equal(np.array(copy), np.array(rows))


def test_dataloader_workers_read_the_store(cache, folder):
    import torch

    decoded = decode_all(load_source(str(folder)), PP, progress=False)
    ds = PixelDataset(decoded.pixels, list(range(16)), list(range(16)), torch.nn.Identity())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         multiprocessing_context="spawn")  # spawn: the dataset goes by pickle
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.from_numpy(np.array(decoded.pixels)))


# ----------------------------------------------------------------------------------------------
# Several runs, killed runs, damaged files
# ----------------------------------------------------------------------------------------------
def _python(code: str, cache_dir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "AFFINAGE_CACHE_DIR": str(cache_dir),
                                            "PYTHONPATH": str(SRC), **env})


DECODE = """
    import sys
    from affinage.data import Preprocessing, decode_all, load_source
    pp = Preprocessing(16, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0, "center")
    decoded = decode_all(load_source(sys.argv[1] if len(sys.argv) > 1 else {root!r}), pp, progress=False)
    print(decoded.decoded_count, len(decoded.samples))
"""


def test_two_processes_decoding_the_same_data_decode_it_once(cache, folder):
    procs = [_python(DECODE.format(root=str(folder)), cache) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    counts = [tuple(map(int, out.split())) for out, _ in outs]
    assert sorted(decoded for decoded, _ in counts) == [0, 16] and {n for _, n in counts} == {16}
    store = ImageStore.for_decoding(16, "bilinear", "center")
    assert store.count() == 16
    again = decode_all(load_source(str(folder)), PP, progress=False)
    assert again.cache_hit and np.array_equal(np.array(again.pixels),
                                              np.stack([reference_pixels(load_source(str(folder)))[s.key]
                                                        for s in again.samples]))


def test_a_killed_writer_leaves_no_row_marked_valid_that_was_not_written(cache, tmp_path):
    root = write_class_folders(tmp_path / "data", per_class=15, classes=("a", "b"))
    settle(root)
    killer = """
        import os
        from affinage import data, store
        store.COMMIT_EVERY = 4
        real, calls = data.load_pixels, []
        def dying(*args):
            calls.append(1)
            if len(calls) == 11:
                os._exit(9)  # like SIGKILL: no cleanup, no commit
            return real(*args)
        data.load_pixels = dying
    """
    killer = textwrap.dedent(killer) + textwrap.dedent(DECODE.format(root=str(root)))
    proc = _python(killer, cache)
    proc.communicate(timeout=120)
    assert proc.returncode == 9
    store = ImageStore.for_decoding(16, "bilinear", "center")
    committed = store.count()
    assert 0 < committed <= 10 and committed % 4 == 0
    images = load_source(str(root))
    again = decode_all(images, PP, progress=False)
    assert again.decoded_count == 30 - committed and store.count() == 30
    expected = reference_pixels(images)
    assert all(np.array_equal(again.pixels[i], expected[s.key]) for i, s in enumerate(again.samples))


def test_a_damaged_shard_is_decoded_again(cache, folder):
    decode_all(load_source(str(folder)), PP, progress=False)
    shard = next((cache / "images").glob("*/shard-00000.npy"))
    with open(shard, "r+b") as fh:
        fh.truncate(1000)  # e.g. a full disk while another tool copied the cache
    images = load_source(str(folder))
    again = decode_all(images, PP, progress=False)
    assert again.decoded_count == 16
    expected = reference_pixels(images)
    assert all(np.array_equal(again.pixels[i], expected[s.key]) for i, s in enumerate(again.samples))


def test_a_store_grows_past_one_shard(cache):
    store = ImageStore(cache / "images" / "raw", 2)
    n = ROWS_PER_SHARD + 5
    with store.appending() as writer:
        assert writer.missing([f"h{i}" for i in range(n)], "d") == [f"h{i}" for i in range(n)]
        for i in range(n):
            writer.put(f"h{i}", np.full((3, 2, 2), i % 251, dtype=np.uint8))
    slots, failed = store.lookup([f"h{i}" for i in range(n)], "d")
    rows = ImageRows(store.folder, 2, [slots[f"h{i}"] for i in range(n)])
    assert failed == {} and len(list(store.folder.glob("shard-*.npy"))) == 2
    assert [int(r[0, 0, 0]) for r in rows] == [i % 251 for i in range(n)]
    assert store.count() == n


def test_a_damaged_index_is_named_with_the_fix(cache, folder):
    from affinage.errors import AffinageError

    decode_all(load_source(str(folder)), PP, progress=False)
    index = next((cache / "images").glob("*/index.sqlite"))
    index.write_bytes(b"not a database" * 100)
    with pytest.raises(AffinageError, match="index.sqlite' cannot be used") as info:
        decode_all(load_source(str(folder)), PP, progress=False)
    assert "delete it" in info.value.fix
