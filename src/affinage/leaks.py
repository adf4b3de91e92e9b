"""Leak check: exact and near-duplicate images across train/val/test, found on the decoded pixels before training.

A test image that is a resized, re-encoded or slightly cropped copy of a training image makes the test figures
optimistic. Exact copies share a content hash; near copies are found with a DCT perceptual hash (the
`imagehash.phash` algorithm, vectorised over the decoded array): every image is already resized to the model's
input size, so a smaller or re-compressed copy decodes to almost the same pixels and hashes a few bits away.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Sample, Splits
from .errors import AffinageError
from .storage import atomic_path, digest

HASH_SIZE = 16  # 256-bit hash: 64 bits (imagehash's default) leaves distinct photos of one flower species too close
# Max Hamming distance (of 256 bits) of a near copy. Resized/re-encoded copies land at <= 12 and 3%-cropped ones at
# <= 40; on Oxford-17 and flowers5 every pair within 48 was the same photo (checked by eye), and distinct photos
# start around 76.
NEAR_DUPLICATE_BITS = 48
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Leak:
    """Two images in different splits that are the same picture; `b` is the one in the later split."""

    a: int
    b: int
    split_a: str
    split_b: str
    kind: str  # exact (same file content) or near (perceptual hash within NEAR_DUPLICATE_BITS)
    distance: int  # Hamming distance between the perceptual hashes (0 for exact copies)


def perceptual_hashes(pixels: np.ndarray, hash_size: int = HASH_SIZE, batch: int = 256) -> np.ndarray:
    """(N, 3, S, S) uint8 images -> (N, hash_size**2) bool DCT hashes: downscale to 4x the hash size, grey,
    2-D DCT, keep the lowest frequencies, threshold at their median (imagehash.phash)."""
    import torch
    from scipy.fft import dct

    side = 4 * hash_size
    out = np.zeros((len(pixels), hash_size * hash_size), dtype=bool)
    luma = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    for start in range(0, len(pixels), batch):
        x = torch.from_numpy(np.array(pixels[start:start + batch]))
        # uint8 antialiased bilinear resize (what torchvision's resize runs; fast on big arrays)
        small = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                align_corners=False).numpy()
        grey = (small * luma).sum(1)
        freq = dct(dct(grey, axis=1), axis=2)[:, :hash_size, :hash_size].reshape(len(grey), -1)
        out[start:start + len(grey)] = freq > np.median(freq, axis=1, keepdims=True)
    return out


def cached_perceptual_hashes(pixels: np.ndarray, content_hashes: Sequence[str], pixels_key: str) -> np.ndarray:
    """`perceptual_hashes`, kept in the cache keyed by the files' contents and how they were decoded (`pixels_key`):
    a rerun on the same images skips the resize + DCT (and importing scipy)."""
    from .storage import cache_dir

    path = cache_dir() / "phash" / f"{digest('phash-v1', str(HASH_SIZE), pixels_key, *content_hashes)}.npy"
    try:
        codes = np.load(path)
        if codes.shape == (len(pixels), HASH_SIZE * HASH_SIZE) and codes.dtype == bool:
            return codes
    except (OSError, ValueError):
        pass
    codes = perceptual_hashes(pixels)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, codes)
    return codes


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two sets of bool hashes: (len(a), len(b)) ints."""
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    return np.rint(fa @ (1 - fb).T + (1 - fa) @ fb.T).astype(np.int32)


def find_leaks(pixels: np.ndarray, content_hashes: Sequence[str], splits: Splits,
               max_distance: int = NEAR_DUPLICATE_BITS, codes: np.ndarray | None = None) -> list[Leak]:
    """Every pair of images in different splits that are exact copies or within `max_distance` hash bits
    (`codes`: the images' perceptual hashes when already known)."""
    member = {i: name for name, idx in splits.items() for i in idx}
    used = sorted(member)
    leaks: dict[tuple[int, int], Leak] = {}

    def add(i: int, j: int, kind: str, distance: int) -> None:
        if member[i] == member[j]:
            return  # a duplicate inside one split is not a leak
        a, b = (i, j) if SPLIT_ORDER[member[i]] < SPLIT_ORDER[member[j]] else (j, i)
        if (a, b) not in leaks or kind == "exact":
            leaks[(a, b)] = Leak(a, b, member[a], member[b], kind, distance)

    by_content: dict[str, list[int]] = {}
    for i in used:
        by_content.setdefault(content_hashes[i], []).append(i)
    for group in by_content.values():
        for x, i in enumerate(group):
            for j in group[x + 1:]:
                add(i, j, "exact", 0)

    if max_distance >= 0 and used:
        codes = perceptual_hashes(pixels) if codes is None else codes
        for earlier, later in (("train", "val"), ("train", "test"), ("val", "test")):
            ia, ib = dict(splits.items())[earlier], dict(splits.items())[later]
            if not ia or not ib:
                continue
            hb = codes[ib]
            for start in range(0, len(ia), 2048):  # bounded memory on large datasets
                chunk = ia[start:start + 2048]
                dist = hamming(codes[chunk], hb)
                for r, c in zip(*np.nonzero(dist <= max_distance)):
                    add(chunk[r], ib[c], "near", int(dist[r, c]))
    return sorted(leaks.values(), key=lambda leak: (SPLIT_ORDER[leak.split_b], leak.distance, leak.a, leak.b))


def write_leaks(path: Path, leaks: Sequence[Leak], samples: Sequence[Sample]) -> None:
    """leaks.csv: one row per pair, both paths and splits, the kind and the hash distance."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "kind", "distance"])
        for leak in leaks:
            sa, sb = samples[leak.a], samples[leak.b]
            w.writerow([sa.key, leak.split_a, sa.label, sb.key, leak.split_b, sb.label, leak.kind, leak.distance])


def read_leaks(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def drop_leaked(splits: Splits, leaks: Sequence[Leak]) -> tuple[Splits, list[int]]:
    """Remove from val/test every image that duplicates one in an earlier split (train before val before test)."""
    dropped = sorted({leak.b for leak in leaks})
    gone = set(dropped)
    val = [i for i in splits.val if i not in gone]
    test = [i for i in splits.test if i not in gone]
    for name, kept in (("val", val), ("test", test)):
        if not kept:
            raise AffinageError(f"--drop-leaks would leave the {name} split empty: all its images duplicate train images",
                                "check the split assignment of your data (see leaks.csv), or train without --drop-leaks")
    how = f"{splits.how}; {len(dropped)} leaked val/test image(s) dropped"
    return Splits(list(splits.train), val, test, how), dropped


def label_conflicts(leaks: Sequence[Leak], samples: Sequence[Sample]) -> int:
    """Pairs of the same picture under two different labels: label noise as well as a leak."""
    return sum(samples[leak.a].label != samples[leak.b].label for leak in leaks)


def summary(leaks: Sequence[Leak], samples: Sequence[Sample] | None = None) -> str:
    """One console line: how many pairs, of which kind, between which splits."""
    if not leaks:
        return "leak check: no duplicate images across train/val/test"
    pairs: dict[str, int] = {}
    for leak in leaks:
        key = f"{leak.split_a}-{leak.split_b}"
        pairs[key] = pairs.get(key, 0) + 1
    exact = sum(leak.kind == "exact" for leak in leaks)
    where = ", ".join(f"{n} {k}" for k, n in pairs.items())
    conflicts = label_conflicts(leaks, samples) if samples is not None else 0
    labels = f"; {conflicts} of them under two different labels" if conflicts else ""
    return (f"leak check: {len(leaks)} duplicate pair(s) across splits ({where}; {exact} exact, {len(leaks) - exact} near"
            f"{labels}); the val/test figures are optimistic")
