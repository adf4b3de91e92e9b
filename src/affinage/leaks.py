"""Leak check: exact and near-duplicate images across train/val/test, found on the decoded pixels before training.

A test image that is a resized, re-encoded or slightly cropped copy of a training image makes the test figures
optimistic. Exact copies share a content hash. Near copies are found in two steps:

1. candidates: a DCT perceptual hash (the `imagehash.phash` algorithm, vectorised over the decoded array) within
   NEAR_DUPLICATE_BITS of 256 bits. Every image is already resized to the model's input size, so a smaller or
   re-compressed copy hashes a few bits away, a 3-5% crop up to ~45 bits. That loose threshold also lets through
   distinct pictures with the same layout: on catalogue photos (fashion_small: product shots on white) ~15,000
   pairs, nearly all different products (a sandal and an oxford shoe, a black and a brown wallet).
2. confirmation on the pixels (`compare_pictures`): 64-px thumbnails of both images; their colour statistics must
   agree; the second is aligned onto the first (zoom + shift, Gauss-Newton, coarse to fine), then, at 32 px, the
   two must have the same edges (correlation of the grey-level gradients >= MIN_EDGE_CORRELATION) and the same
   colours (95% of the pixels within MAX_COLOUR_DIFFERENCE of 255). A colour variant of a product shot (the same
   photo recoloured: black and green gloves) is a different product and is not reported; nor is a copy shrunk to
   a third and saved at JPEG quality 40 (its colours move ~13).

Measured with the Python API on the decoded pixels (EfficientNet-Lite0's preprocessing, seed-0 splits): Oxford-17,
its 40 genuine duplicate pairs (a shifted crop among them) and 10/10 planted resized + re-encoded copies;
fashion_small, 54 pairs out of ~15,000 candidates: the 53 exact copies and one re-encoded copy, each checked by eye.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import PATH_ERRORS, Sample, Splits
from .errors import AffinageError
from .storage import atomic_path, digest

HASH_SIZE = 16  # 256-bit hash: 64 bits (imagehash's default) leaves distinct photos of one flower species too close
# Max Hamming distance (of 256 bits) of a candidate pair. Resized/re-encoded copies land at <= 12, 3%-cropped ones
# at <= 40 and one shifted crop in Oxford-17 at 44; distinct photos of flowers start around 76, but distinct product
# shots on a white background go down to ~10: a candidate is only reported once its pixels confirm it.
NEAR_DUPLICATE_BITS = 48
THUMBNAIL_SIDE = 64  # pixels compared per side; 12 KB (uint8 RGB) per image that is in a candidate pair
MAX_STATS_DIFFERENCE = 12.0  # of 255: per-channel mean and spread of a copy and its original (a crop moves them ~6)
# After alignment, at 32 px. Measured on copies (Oxford-17's 40 genuine pairs, 10 planted resized + JPEG-70 copies,
# hymenoptera photos resized, halved at JPEG 50, cropped 3-8%) and on fashion_small's ~15,000 candidate pairs:
MIN_EDGE_CORRELATION = 0.97  # grey-level gradients: copies >= 0.990; alone it separates little on product shots
MAX_COLOUR_DIFFERENCE = 9.0  # of 255, 95th percentile per pixel: copies <= 7.9, other products >= 10.7
COARSE_COLOUR_DIFFERENCE = 32.0  # the same after a 16-px alignment only: crops of 3-8% land at 16-27
MAX_ZOOM = 0.25  # alignment search range: log-zoom and shift (in half image widths) within +-0.25
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Leak:
    """Two images in different splits that are the same picture; `b` is the one in the later split."""

    a: int
    b: int
    split_a: str
    split_b: str
    kind: str  # exact (same file content) or near (hash within NEAR_DUPLICATE_BITS and confirmed on the pixels)
    distance: int  # Hamming distance between the perceptual hashes (0 for exact copies)
    edges: float | None = None  # near: correlation of the aligned gradients (see compare_pictures)
    colours: float | None = None  # near: 95th-percentile colour difference after alignment, of 255


def perceptual_hashes(pixels: Any, hash_size: int = HASH_SIZE, batch: int = 256) -> np.ndarray:
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


def cached_perceptual_hashes(pixels: Any, content_hashes: Sequence[str], pixels_key: str) -> np.ndarray:
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


def find_leaks(pixels: Any, content_hashes: Sequence[str], splits: Splits,
               max_distance: int = NEAR_DUPLICATE_BITS, codes: np.ndarray | None = None) -> list[Leak]:
    """Every pair of images in different splits that are exact copies, or within `max_distance` hash bits and
    confirmed as the same picture by `compare_pictures` (`codes`: the images' perceptual hashes when known).
    `pixels` needs only `len`, `pixels[i]` and slices."""
    member = {i: name for name, idx in splits.items() for i in idx}
    leaks: dict[tuple[int, int], Leak] = {}

    def ordered(i: int, j: int) -> tuple[int, int]:
        return (i, j) if SPLIT_ORDER[member[i]] < SPLIT_ORDER[member[j]] else (j, i)

    by_content: dict[str, list[int]] = {}
    for i in sorted(member):
        by_content.setdefault(content_hashes[i], []).append(i)
    for group in by_content.values():
        for x, i in enumerate(group):
            for j in group[x + 1:]:
                if member[i] != member[j]:  # a duplicate inside one split is not a leak
                    a, b = ordered(i, j)
                    leaks[(a, b)] = Leak(a, b, member[a], member[b], "exact", 0)

    if max_distance >= 0 and member:
        codes = perceptual_hashes(pixels) if codes is None else codes
        pairs = [(a, b, d) for a, b, d in _hash_candidates(codes, splits, max_distance) if (a, b) not in leaks]
        if pairs:
            first, second, distance = (np.array(column) for column in zip(*pairs))
            same, edges, colours = compare_pictures(pixels, first, second)
            for k in np.flatnonzero(same):
                a, b = int(first[k]), int(second[k])
                leaks[(a, b)] = Leak(a, b, member[a], member[b], "near", int(distance[k]),
                                     round(float(edges[k]), 4), round(float(colours[k]), 2))
    return sorted(leaks.values(), key=lambda leak: (SPLIT_ORDER[leak.split_b], leak.distance, leak.a, leak.b))


def duplicate_pairs(pixels: Any, content_hashes: Sequence[str], indices: Sequence[int], codes: np.ndarray,
                    max_distance: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, str]]:
    """(i, j, kind) for every pair among `indices` that is the same picture, by the rules of `find_leaks` (exact
    copies, and near copies confirmed on the pixels), but within one set: cross-validation keeps them in one fold."""
    idx = sorted(int(i) for i in indices)
    found: dict[tuple[int, int], str] = {}
    by_content: dict[str, list[int]] = {}
    for i in idx:
        by_content.setdefault(content_hashes[i], []).append(i)
    for group in by_content.values():
        found.update({(i, j): "exact" for x, i in enumerate(group) for j in group[x + 1:]})
    if max_distance < 0 or len(idx) < 2:
        return [(i, j, kind) for (i, j), kind in sorted(found.items())]
    candidates = []
    everyone = np.asarray(idx)
    for start in range(0, len(idx), 2048):  # bounded memory on large datasets
        chunk = idx[start:start + 2048]
        dist = hamming(codes[chunk], codes[everyone])
        candidates += [(chunk[r], idx[c]) for r, c in zip(*np.nonzero(dist <= max_distance))
                       if chunk[r] < idx[c] and (chunk[r], idx[c]) not in found]
    if candidates:
        first, second = (np.array(column) for column in zip(*candidates))
        same, _, _ = compare_pictures(pixels, first, second)
        found.update({(int(first[k]), int(second[k])): "near" for k in np.flatnonzero(same)})
    return [(i, j, kind) for (i, j), kind in sorted(found.items())]


def _hash_candidates(codes: np.ndarray, splits: Splits, max_distance: int) -> list[tuple[int, int, int]]:
    """(earlier-split image, later-split image, hash distance) for every cross-split pair within `max_distance`."""
    named = dict(splits.items())
    out = []
    for earlier, later in (("train", "val"), ("train", "test"), ("val", "test")):
        ia, ib = named[earlier], named[later]
        if not ia or not ib:
            continue
        hb = codes[ib]
        for start in range(0, len(ia), 2048):  # bounded memory on large datasets
            chunk = ia[start:start + 2048]
            dist = hamming(codes[chunk], hb)
            out += [(chunk[r], ib[c], int(dist[r, c])) for r, c in zip(*np.nonzero(dist <= max_distance))]
    return out


# ----------------------------------------------------------------------------------------------
# Confirmation on the pixels
# ----------------------------------------------------------------------------------------------
def compare_pictures(pixels: Any, first: np.ndarray, second: np.ndarray, batch: int = 2048,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whether images `first[k]` and `second[k]` are the same picture (a resized, re-encoded or slightly cropped
    copy): (same, edge correlation, colour difference), one entry per pair; see the module docstring. A cascade,
    cheapest test first: colour statistics, then a 16-px alignment, then the 64-px one for what is left."""
    import torch

    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    used, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    thumbs = _thumbnails(pixels, used)
    fa, fb = inverse[:len(first)], inverse[len(first):]
    core = _centre(thumbs).astype(np.float32)  # the centre: what a small crop keeps
    mean, spread = core.mean(axis=(2, 3)), core.std(axis=(2, 3))
    todo = np.flatnonzero((np.abs(mean[fa] - mean[fb]).max(axis=1) <= MAX_STATS_DIFFERENCE)
                          & (np.abs(spread[fa] - spread[fb]).max(axis=1) <= MAX_STATS_DIFFERENCE))
    edges = np.zeros(len(first), dtype=np.float32)
    colours = np.full(len(first), 255.0, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(todo), batch):
            k = todo[start:start + batch]
            x, y = torch.from_numpy(thumbs[fa[k]]).float(), torch.from_numpy(thumbs[fb[k]]).float()
            # coarse: 16 px; a copy is far within COARSE_COLOUR_DIFFERENCE there, most other pictures far above it
            x16, y16 = torch.nn.functional.avg_pool2d(x, 4), torch.nn.functional.avg_pool2d(y, 4)
            params = _align(x16.mean(1, keepdim=True), y16.mean(1, keepdim=True), ((16, 8),))
            coarse = _colour_difference(_centre(x16), _centre(_warp(y16, params)))
            keep = torch.from_numpy(coarse <= COARSE_COLOUR_DIFFERENCE)
            if not keep.any():
                continue
            x, y, k = x[keep], y[keep], k[keep.numpy()]
            aligned = _warp(y, _align(x.mean(1, keepdim=True), y.mean(1, keepdim=True), ((32, 5), (64, 2)),
                                      params[keep]))
            # compared at 32 px: the bilinear resampling of the alignment blurs the finest (64-px) gradients
            x, aligned = (torch.nn.functional.avg_pool2d(_centre(t), 2) for t in (x, aligned))
            edges[k] = _ncc(_gradients(x.mean(1, keepdim=True)), _gradients(aligned.mean(1, keepdim=True))).numpy()
            colours[k] = _colour_difference(x, aligned)
    same = (edges >= MIN_EDGE_CORRELATION) & (colours <= MAX_COLOUR_DIFFERENCE)
    return same, edges, colours


def _colour_difference(a: Any, b: Any) -> np.ndarray:
    """95th percentile over the pixels of the largest channel difference, of 255: one value per image pair."""
    import torch

    return torch.quantile((a - b).abs().amax(1).flatten(1), 0.95, dim=1).numpy()


def _thumbnails(pixels: Any, indices: np.ndarray, batch: int = 256) -> np.ndarray:
    """(len(indices), 3, THUMBNAIL_SIDE, THUMBNAIL_SIDE) uint8: the same antialiased resize as the hash."""
    import torch

    out = np.zeros((len(indices), 3, THUMBNAIL_SIDE, THUMBNAIL_SIDE), dtype=np.uint8)
    for start in range(0, len(indices), batch):
        x = torch.from_numpy(np.stack([np.asarray(pixels[int(i)]) for i in indices[start:start + batch]]))
        out[start:start + len(x)] = torch.nn.functional.interpolate(
            x, size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE), mode="bilinear", antialias=True, align_corners=False).numpy()
    return out


def _centre(x: Any, margin: float = 0.1) -> Any:
    k = round(x.shape[-1] * margin)
    return x[..., k:x.shape[-1] - k, k:x.shape[-1] - k]


def _ncc(a: Any, b: Any) -> Any:
    """Normalised cross-correlation per image of two (n, ...) tensors."""
    dims = tuple(range(1, a.dim()))
    a, b = a - a.mean(dim=dims, keepdim=True), b - b.mean(dim=dims, keepdim=True)
    return (a * b).sum(dim=dims) / ((a * a).sum(dim=dims) * (b * b).sum(dim=dims)).clamp_min(1e-12).sqrt()


def _gradients(grey: Any) -> Any:
    import torch

    return torch.cat([grey[..., :-1, 1:] - grey[..., :-1, :-1], grey[..., 1:, :-1] - grey[..., :-1, :-1]], 1)


def _warp(images: Any, params: Any) -> Any:
    """Sample `images` (n, C, S, S) at zoom * xy + shift, params (n, 3) = (log zoom, shift x, shift y) in
    grid_sample's [-1, 1] coordinates."""
    import torch

    side = images.shape[-1]
    coords = (torch.arange(side, dtype=images.dtype) + 0.5) * (2 / side) - 1
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1)  # (S, S, 2): x, y
    grid = params[:, None, None, :1].exp() * grid + params[:, None, None, 1:]
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _align(target: Any, moving: Any, schedule: Sequence[tuple[int, int]], params: Any = None) -> Any:
    """Zoom + shift (n, 3) that map `moving` onto `target` (n, 1, S, S grey), from `params` (default: none):
    Gauss-Newton on the brightness-normalised difference over the centre, `iterations` steps at each `side` of
    `schedule`, coarse to fine."""
    import torch

    n = len(target)
    params = torch.zeros(n, 3) if params is None else params
    for side, iterations in schedule:
        a, b = (x if x.shape[-1] == side else torch.nn.functional.adaptive_avg_pool2d(x, side) for x in (target, moving))
        k = max(1, round(side * 0.1))
        inner = slice(k, side - k)
        a = _standardise(a[..., inner, inner]).reshape(n, -1)
        coords = (torch.arange(side, dtype=torch.float32) + 0.5) * (2 / side) - 1
        yy, xx = (c[inner, inner].reshape(1, -1) for c in torch.meshgrid(coords, coords, indexing="ij"))
        for _ in range(iterations):
            w = _warp(b, params)
            core = w[..., inner, inner]
            scale = core.std(dim=(1, 2, 3), unbiased=False, keepdim=True).clamp_min(1e-3)
            residual = a - ((core - core.mean(dim=(1, 2, 3), keepdim=True)) / scale).reshape(n, -1)
            # central differences per unit of grid coordinate (one pixel = 2 / side), normalised like `core`
            gx = (w[..., inner, k + 1:side - k + 1] - w[..., inner, k - 1:side - k - 1]) * (side / 4) / scale
            gy = (w[..., k + 1:side - k + 1, inner] - w[..., k - 1:side - k - 1, inner]) * (side / 4) / scale
            gx, gy = gx.reshape(n, -1), gy.reshape(n, -1)
            zoom = params[:, :1].exp()
            jacobian = torch.stack([gx * xx + gy * yy, gx / zoom, gy / zoom], 1)  # d w / d (log zoom, shift x, y)
            hessian = jacobian @ jacobian.transpose(1, 2) + 1e-3 * torch.eye(3)
            step = torch.linalg.solve(hessian, jacobian @ residual.unsqueeze(2)).squeeze(2)
            params = (params + step).clamp(-MAX_ZOOM, MAX_ZOOM)
    return params


def _standardise(x: Any) -> Any:
    dims = (1, 2, 3)
    x = x - x.mean(dim=dims, keepdim=True)
    return x / x.std(dim=dims, unbiased=False, keepdim=True).clamp_min(1e-3)


def write_leaks(path: Path, leaks: Sequence[Leak], samples: Sequence[Sample]) -> None:
    """leaks.csv: one row per pair, both paths and splits, the kind, the hash distance and (near copies) the
    pixel evidence: edge correlation and colour difference after alignment."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
        w = csv.writer(fh)
        w.writerow(["path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "kind", "distance", "edges",
                    "colours"])
        for leak in leaks:
            sa, sb = samples[leak.a], samples[leak.b]
            w.writerow([sa.key, leak.split_a, sa.label, sb.key, leak.split_b, sb.label, leak.kind, leak.distance,
                        "" if leak.edges is None else leak.edges, "" if leak.colours is None else leak.colours])


def read_leaks(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
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
