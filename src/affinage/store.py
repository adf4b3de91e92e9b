"""Image store: decoded images kept on disk content-addressed (file hash -> row of a shard), so a run decodes only the
images the store has never seen and reads rows in place (memory-mapped views, never a dataset-sized copy).

One folder per way of decoding (stored side, interpolation, crop mode) under cache_dir()/images/:
    shard-00000.npy ...  (ROWS_PER_SHARD, 3, S, S) uint8, filled in order; a row counts only once it is indexed
    index.sqlite         rows: content hash -> slot (shard * ROWS_PER_SHARD + row); failed: hash -> reason, decoder
    lock                 held (flock) by the one process appending: two runs on the same data decode it once
A writer indexes rows only after writing them, so a killed run leaves rows that are written but never indexed:
no reader sees them and the next writer overwrites them. Indexed rows are never rewritten, so readers need no lock.

Also here: FileHashes, the (path, size, mtime) -> content hash memo that spares a rerun reading unchanged files.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AffinageError
from .storage import cache_dir

STORE_VERSION = "v1"  # part of the folder name: bump it when the stored pixels of a file change (resize/crop code)
ROWS_PER_SHARD = 1024  # 200 MB shards at 256 px; a store grows one shard at a time
COMMIT_EVERY = 256  # rows indexed per transaction: a killed run loses at most this much decoding
RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime tick: not memoised
_SQL_CHUNK = 900  # host parameters per query (SQLite's historical limit is 999)


def _connect(path: Path, *schema: str) -> sqlite3.Connection:
    """An index database with its tables; AffinageError naming the file when it is damaged or cannot be opened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(str(path), timeout=600, check_same_thread=False)
        with db:
            for statement in schema:
                db.execute(statement)
    except sqlite3.DatabaseError as exc:
        raise AffinageError(f"the cache index '{path}' cannot be used: {exc}",
                            "delete it (it is a cache: what it indexes is decoded or hashed again)") from None
    return db


def _select_in(db: sqlite3.Connection, sql: str, keys: Sequence[Any], *params: Any) -> Iterator[tuple[Any, ...]]:
    """Rows of `sql` (ending in `IN`) for `keys`, queried in chunks; `params` bind before the keys."""
    for start in range(0, len(keys), _SQL_CHUNK):
        chunk = list(keys[start:start + _SQL_CHUNK])
        yield from db.execute(f"{sql} ({','.join('?' * len(chunk))})", (*params, *chunk))


def _fsync(fd: int) -> None:
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npy"


def _open_shard(folder: Path, shard: int, side: int) -> np.memmap:
    """A shard's rows, read-only and memory-mapped; AffinageError when the file is not a shard of this store."""
    path = _shard_path(folder, shard)
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise AffinageError(f"image store shard '{path}' cannot be read: {exc}",
                            f"delete the folder {folder} (it is a cache: the images are decoded again)") from None
    if rows.shape != (ROWS_PER_SHARD, 3, side, side) or rows.dtype != np.uint8:
        raise AffinageError(f"image store shard '{path}' holds {rows.dtype} {rows.shape}, not "
                            f"uint8 {(ROWS_PER_SHARD, 3, side, side)}", f"delete the folder {folder} (it is a cache)")
    return rows


class ImageRows:
    """Read-only (N, 3, S, S) uint8 images from the store, in a chosen order. `rows[i]` is a view into a memory-mapped
    shard; slices and index lists gather a copy of just those rows (`take`). Pickling carries the folder and the slot
    table, never pixels: DataLoader workers open the shards themselves, when first read."""

    def __init__(self, folder: str | os.PathLike[str], side: int, slots: Iterable[int] | np.ndarray):
        self.folder, self.side = Path(folder), int(side)
        self.slots = np.array(slots, dtype=np.int64).reshape(-1)
        self.slots.flags.writeable = False
        self._shards: dict[int, np.memmap] = {}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.slots), 3, self.side, self.side)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self) -> int:
        return len(self.slots)

    def __repr__(self) -> str:
        return f"ImageRows({len(self)} x 3x{self.side}x{self.side} uint8 from {self.folder})"

    def _shard(self, shard: int) -> np.memmap:
        rows = self._shards.get(shard)
        if rows is None:  # two threads may both open it: harmless, one mapping is kept
            rows = self._shards[shard] = _open_shard(self.folder, shard, self.side)
        return rows

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            shard, row = divmod(int(self.slots[key]), ROWS_PER_SHARD)
            return np.asarray(self._shard(shard)[row])
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        if isinstance(key, tuple):
            raise TypeError("ImageRows takes one index (an int, a slice or a list of ints): index the array it returns")
        return self.take(key)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: Any) -> np.ndarray:
        """The images at `indices` (ints, or a bool mask) as one new (n, 3, S, S) array: for batches, not for all."""
        idx = np.asarray(indices)
        idx = np.nonzero(idx)[0] if idx.dtype == bool else idx.astype(np.int64, copy=False).reshape(-1)
        shards, rows = np.divmod(self.slots[idx], ROWS_PER_SHARD)
        out = np.empty((len(idx), 3, self.side, self.side), dtype=np.uint8)
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            out[where] = self._shard(int(shard))[rows[where]]
        return out

    def subset(self, indices: Any) -> ImageRows:
        """A view of some of these images (no pixel is read)."""
        return ImageRows(self.folder, self.side, self.slots[np.asarray(indices, dtype=np.int64)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.take(np.arange(len(self)))  # every row in memory: for small sets and tests
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "side": self.side, "slots": self.slots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["side"], state["slots"])  # type: ignore[misc]


class ImageStore:
    """The append-only store of one way of decoding; see the module docstring for the layout."""

    def __init__(self, folder: str | os.PathLike[str], side: int):
        self.folder, self.side = Path(folder), int(side)
        self.row_bytes = 3 * self.side * self.side
        self._db = _connect(self.folder / "index.sqlite",
                            "CREATE TABLE IF NOT EXISTS rows (sha TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE)",
                            "CREATE TABLE IF NOT EXISTS failed (sha TEXT PRIMARY KEY, reason TEXT NOT NULL, "
                            "decoder TEXT NOT NULL)")
        self._healthy: set[int] = set()

    @classmethod
    def for_decoding(cls, side: int, interpolation: str, crop_mode: str) -> ImageStore:
        """The store under the cache for images stored at `side` pixels, resized and cropped this way."""
        how = re.sub(r"[^A-Za-z0-9]+", "_", f"{interpolation}-{crop_mode}")
        return cls(cache_dir() / "images" / f"{STORE_VERSION}-{side}px-{how}", side)

    def close(self) -> None:
        self._db.close()

    def lookup(self, shas: Sequence[str], decoder: str,
               writer: StoreWriter | None = None) -> tuple[dict[str, int], dict[str, str]]:
        """The slot of each stored hash, and the reason of each hash that `decoder` failed on. Rows of a shard that
        is gone or damaged are forgotten here (they are decoded again), by `writer` when the caller holds one."""
        unique = sorted(set(shas))
        slots = dict(_select_in(self._db, "SELECT sha, slot FROM rows WHERE sha IN", unique))
        failed = dict(_select_in(self._db, "SELECT sha, reason FROM failed WHERE decoder = ? AND sha IN", unique,
                                 decoder))
        damaged = {shard for shard in {slot // ROWS_PER_SHARD for slot in slots.values()} - self._healthy
                   if not self._shard_ok(shard)}
        if damaged:
            if writer is not None:
                writer.forget_shards(damaged)
            else:
                with self.appending() as own:
                    own.forget_shards(damaged)
            slots = {sha: slot for sha, slot in slots.items() if slot // ROWS_PER_SHARD not in damaged}
        return slots, failed

    def _shard_ok(self, shard: int) -> bool:
        try:
            _open_shard(self.folder, shard, self.side)
        except AffinageError:
            return False
        self._healthy.add(shard)
        return True

    def rows(self, slots: Sequence[int]) -> ImageRows:
        return ImageRows(self.folder, self.side, slots)

    def count(self) -> int:
        """Images stored."""
        return int(self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def disk_bytes(self) -> int:
        """Bytes the shards take on disk (allocated blocks: a shard being filled is sparse)."""
        return sum(p.stat().st_blocks * 512 for p in self.folder.glob("shard-*.npy"))

    @contextlib.contextmanager
    def appending(self) -> Iterator[StoreWriter]:
        """A writer, with the store's lock held; rows completely written are indexed on the way out (also when the
        block raises: finished work is kept)."""
        import fcntl

        with open(self.folder / "lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            except OSError as exc:
                raise AffinageError(f"cannot lock the image store {self.folder}: {exc.strerror or exc}",
                                    "point AFFINAGE_CACHE_DIR at a local disk (its file system must support flock)"
                                    ) from None
            for stale in self.folder.glob(".shard-*.tmp"):  # a shard a killed writer was creating
                stale.unlink(missing_ok=True)
            writer = StoreWriter(self)
            try:
                yield writer
            finally:
                writer.close()


class StoreWriter:
    """Appends rows to a store (thread-safe: decoding threads call `put` and `fail` concurrently). Made by
    `ImageStore.appending`, which holds the store's lock for it."""

    def __init__(self, store: ImageStore):
        self.store = store
        self._lock = threading.Lock()
        self._next = int(store._db.execute("SELECT COALESCE(MAX(slot) + 1, 0) FROM rows").fetchone()[0])
        self._rows: list[tuple[str, int]] = []
        self._failed: list[tuple[str, str, str]] = []
        self._files: dict[int, tuple[int, int]] = {}  # shard -> (fd, offset of row 0)
        self._dirty: set[int] = set()
        self.written = 0  # rows put
        self.refused = 0  # contents that failed to decode

    def missing(self, shas: Iterable[str], decoder: str) -> list[str]:
        """Those of `shas` neither stored nor failed, read again under the lock (another run may have added them)."""
        wanted = list(dict.fromkeys(shas))
        slots, failed = self.store.lookup(wanted, decoder, writer=self)
        return [sha for sha in wanted if sha not in slots and sha not in failed]

    def put(self, sha: str, pixels: np.ndarray) -> None:
        """Write one image's row; it is indexed with the next commit."""
        side = self.store.side
        assert pixels.shape == (3, side, side) and pixels.dtype == np.uint8, (pixels.shape, pixels.dtype)
        with self._lock:
            slot, self._next = self._next, self._next + 1
            shard, row = divmod(slot, ROWS_PER_SHARD)
            fd, offset = self._file(shard)
        data = memoryview(np.ascontiguousarray(pixels)).cast("B")
        position = offset + row * self.store.row_bytes
        try:
            while data:
                done = os.pwrite(fd, data, position)
                data, position = data[done:], position + done
        except OSError as exc:
            raise self._write_error(exc) from None
        with self._lock:
            self._rows.append((sha, slot))
            self._dirty.add(shard)
            self.written += 1
            if len(self._rows) >= COMMIT_EVERY:
                self._commit()

    def fail(self, sha: str, reason: str, decoder: str) -> None:
        """Remember that `decoder` cannot decode this content, so later runs list it without trying again."""
        with self._lock:
            self._failed.append((sha, reason, decoder))
            self.refused += 1

    def _file(self, shard: int) -> tuple[int, int]:
        """The open shard (created when new), as (fd, offset of its first row); call with the lock held."""
        if shard not in self._files:
            folder, side = self.store.folder, self.store.side
            path = _shard_path(folder, shard)
            if not self.store._shard_ok(shard):  # new, or left damaged by a killed writer: nothing indexed in it
                tmp = path.with_name(f".{path.name}.tmp")
                shape = (ROWS_PER_SHARD, 3, side, side)
                try:
                    with open(tmp, "wb") as fh:  # a .npy header, then zeros left sparse until rows are written
                        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False,
                                                                  "shape": shape})
                        fh.truncate(fh.tell() + ROWS_PER_SHARD * self.store.row_bytes)
                    os.replace(tmp, path)
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    raise self._write_error(exc) from None
            offset = _open_shard(folder, shard, side).offset
            self._files[shard] = (os.open(path, os.O_RDWR), offset)
        return self._files[shard]

    def _write_error(self, exc: OSError) -> AffinageError:
        if exc.errno == errno.ENOSPC:
            return AffinageError(f"no space left on the device for the image store {self.store.folder}",
                                 "free disk space, or point AFFINAGE_CACHE_DIR at a larger disk")
        return AffinageError(f"cannot write the image store {self.store.folder}: {exc.strerror or exc}",
                             "check the folder's permissions, or point AFFINAGE_CACHE_DIR elsewhere")

    def _commit(self) -> None:
        """Index the rows written so far (after they reach the disk); call with the lock held."""
        for shard in self._dirty:
            _fsync(self._files[shard][0])
        self._dirty.clear()
        with self.store._db as db:
            db.executemany("INSERT OR IGNORE INTO rows (sha, slot) VALUES (?, ?)", self._rows)
            db.executemany("INSERT OR REPLACE INTO failed (sha, reason, decoder) VALUES (?, ?, ?)", self._failed)
        self._rows, self._failed = [], []

    def forget_shards(self, shards: Iterable[int]) -> None:
        """Drop the rows of shards that are gone or damaged, and their files."""
        with self._lock, self.store._db as db:
            for shard in shards:
                db.execute("DELETE FROM rows WHERE slot BETWEEN ? AND ?",
                           (shard * ROWS_PER_SHARD, (shard + 1) * ROWS_PER_SHARD - 1))
                _shard_path(self.store.folder, shard).unlink(missing_ok=True)
            self._next = int(db.execute("SELECT COALESCE(MAX(slot) + 1, 0) FROM rows").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            try:
                self._commit()
            finally:
                for fd, _ in self._files.values():
                    os.close(fd)
                self._files.clear()


class FileHashes:
    """Content hashes of files seen before, keyed by (absolute path, size, mtime): a rerun reads no byte of a file
    whose size and mtime are unchanged. Paths are stored as bytes (file names need not be UTF-8)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else cache_dir() / "file-hashes.sqlite"
        self._db = _connect(self.path, "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, "
                                       "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha TEXT NOT NULL)")

    def known(self, keys: Sequence[tuple[bytes, int, int]]) -> list[str | None]:
        """The hash of each (path, size, mtime_ns) seen before with that size and mtime, else None."""
        seen = {path: (size, mtime, sha) for path, size, mtime, sha in
                _select_in(self._db, "SELECT path, size, mtime_ns, sha FROM files WHERE path IN",
                           [k[0] for k in keys])}
        out: list[str | None] = []
        for path, size, mtime in keys:
            entry = seen.get(path)
            out.append(entry[2] if entry is not None and entry[:2] == (size, mtime) else None)
        return out

    def remember(self, entries: Sequence[tuple[bytes, int, int, str]]) -> None:
        """Store (path, size, mtime_ns, hash) of files just hashed; files modified within the last RACY_NS are left
        out (a change in the same mtime tick would go unnoticed)."""
        now = time.time_ns()
        settled = [e for e in entries if now - e[2] >= RACY_NS]
        if settled:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, sha) VALUES (?, ?, ?, ?)",
                                     settled)

    def close(self) -> None:
        self._db.close()
