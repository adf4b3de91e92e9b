"""Folds: stratified (and grouped) k-fold assignment of images, kept apart from crossval so that the audit's
out-of-fold probe (audit.py) and the cross-validation (crossval.py) share it without importing the pipeline.

Images tied by a group or as duplicate pictures (the leak check's rules) form one cluster and share a fold, so a
copy is never in train while its original is tested.
"""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import Splits
from .errors import AffinageError
from .seeding import stage_seed

FEW_SHOT_MAX = 5  # classes of at most this many images: the prototype classifier is tried beside the strategy


@dataclass(frozen=True)
class Folds:
    """The test fold of each cross-validated image (1..k; 0: trains in every fold, tested in none) and how."""

    fold: np.ndarray
    k: int
    how: str
    clusters: np.ndarray  # per image: its cluster (group and duplicates merged); images of one cluster share a fold


# ----------------------------------------------------------------------------------------------
def clusters_of(n: int, groups: Sequence[str | None] | None = None,
                duplicates: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Connected components of "same group" and "same picture": a cluster id per image (0..n-1)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = [(i, j) for i, j in duplicates]
    first: dict[str, int] = {}
    for i, g in enumerate(groups or []):
        if g is not None:
            edges.append((first.setdefault(g, i), i))
    if not edges:
        return np.arange(n)
    rows, cols = (np.array(c, dtype=np.int64) for c in zip(*edges))
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def make_folds(labels: Sequence[str], k: int, seed: int, groups: Sequence[str | None] | None = None,
               duplicates: Sequence[tuple[int, int]] = ()) -> Folds:
    """Stratified folds over images with these `labels` (StratifiedGroupKFold where groups or duplicate pairs tie
    images together), seeded. A class of one image gets fold 0. K larger than the smallest class is refused, naming
    it, unless that class is few-shot (at most FEW_SHOT_MAX images: its images then go to different folds)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = list(labels)
    counts = Counter(labels)
    clusters = clusters_of(len(labels), groups, duplicates)
    tested = np.array([i for i, c in enumerate(labels) if counts[c] > 1], dtype=np.int64)
    smallest = min((counts[labels[i]], labels[i]) for i in tested) if len(tested) else (0, "")
    if smallest[0] < k and smallest[0] > FEW_SHOT_MAX:
        raise AffinageError(f"class '{smallest[1]}' has {smallest[0]} images, fewer than --folds {k}: some folds "
                            "would test none of it", f"pass --folds {smallest[0]} or fewer, or add images to it")
    n_clusters = len(set(clusters[tested].tolist()))
    if n_clusters < k:
        raise AffinageError(f"--folds {k} needs {k} independent images to test, but the classes of two or more images "
                            f"hold {n_clusters} (groups and duplicate pictures count once)",
                            f"pass --folds {max(2, n_clusters)} or fewer, or add images")
    y = np.array(labels, dtype=object)[tested]
    grouped = len(set(clusters[tested].tolist())) < len(tested)
    rs = stage_seed(seed, "folds")
    splitter = (StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=rs) if grouped
                else StratifiedKFold(n_splits=k, shuffle=True, random_state=rs))
    fold = np.zeros(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")  # few-shot classes: said in the run
        parts = (splitter.split(np.zeros(len(tested)), y, clusters[tested]) if grouped
                 else splitter.split(np.zeros(len(tested)), y))
        for f, (_, test) in enumerate(parts, start=1):
            fold[tested[test]] = f
    how = (f"{'StratifiedGroupKFold' if grouped else 'StratifiedKFold'}, {k} folds, shuffled with seed {seed}"
           + (f"; {len(tested) - n_clusters} image(s) tied to others by a group or as duplicates" if grouped else "")
           + (f"; {len(labels) - len(tested)} image(s) of one-image classes train in every fold" if
              len(tested) < len(labels) else ""))
    return Folds(fold, k, how, clusters)


def carve_val(indices: Sequence[int], labels: Sequence[str], clusters: np.ndarray, fraction: float,
              seed: int) -> tuple[list[int], list[int]]:
    """(train, val) of `indices`: about `fraction` of each class to val, whole clusters only, and never a class's
    last image (a class of one image here stays in train)."""
    counts = Counter(labels[i] for i in indices)
    want = {c: min(n - 1, max(1, round(n * fraction))) for c, n in counts.items()}
    members: dict[int, list[int]] = defaultdict(list)
    for i in sorted(indices):
        members[int(clusters[i])].append(i)
    taken: Counter[str] = Counter()
    val: list[int] = []
    for cid in np.random.default_rng(seed).permutation(sorted(members)):
        need = Counter(labels[i] for i in members[int(cid)])
        if all(taken[c] + m <= want[c] for c, m in need.items()):
            val += members[int(cid)]
            taken.update(need)
    chosen = set(val)
    return sorted(i for i in indices if i not in chosen), sorted(val)


def fold_splits(pool: np.ndarray, folds: Folds, f: int, labels: Sequence[str], val_fraction: float,
                seed: int) -> Splits:
    """Fold `f`'s splits (indices into the decoded samples): test = the fold, train/val carved from the others."""
    test = [int(i) for i in pool[folds.fold == f]]
    rest = [int(i) for i in pool[folds.fold != f]]
    clusters = np.zeros(max(pool) + 1, dtype=np.int64)
    clusters[pool] = folds.clusters
    train, val = carve_val(rest, labels, clusters, val_fraction, stage_seed(seed, f"fold-{f}-val"))
    if not val:
        raise AffinageError(f"fold {f} leaves no image to validate on (every class has one image left once its test "
                            "images are held out)", f"pass --folds {max(2, folds.k - 1)} or fewer, or add images")
    return Splits(train, val, test, f"cross-validation fold {f} of {folds.k} ({folds.how}); val carved from the "
                                    f"other folds ({val_fraction:.0%} of each class)")
