"""Backbone choice (`--models a,b,c`, `--model auto`): each candidate backbone's frozen features (cached) under the
tuned probe, scored on val by `selection.choose`; where val cannot separate two, the smaller one is kept (the
guides: prefer smaller models where possible). The winner's features are then a cache hit for the run itself.

Runs before the run directory exists and sees only train and val: the test split is never scored here.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig

BUILT_INS = ("efficientnet_lite0", "efficientnet_lite2")  # `--model auto`


@dataclass(frozen=True)
class Ranking:
    chosen: str
    reason: str
    table: list[dict[str, Any]]


def candidate_models(cfg: TrainConfig) -> list[str]:
    if cfg.models:
        return list(dict.fromkeys(cfg.models))
    return list(BUILT_INS) if cfg.model == "auto" else []


def rank_backbones(cfg: TrainConfig, images: Any, log: Callable[[str], None], progress: bool = False) -> Ranking:
    import torch

    from . import distributed as dist
    from .backbones import create_model, fingerprint
    from .data import decode_all, drop_small_classes, make_splits, read_split_lists
    from .inference import cached_features, default_device, resolve_precision
    from .labels import LabelSpace
    from .probe import fit_probe
    from .seeding import seeded, stage_seed
    from .selection import Scored, choose

    device = default_device()
    precision = resolve_precision(cfg.precision, device)
    scored: list[Scored] = []
    y_val = None
    for name in candidate_models(cfg):
        t0 = time.perf_counter()
        with seeded(cfg.seed, "backbone"):
            net = create_model(name, num_classes=2, pretrained=cfg.pretrained, image_size=cfg.image_size,
                               trust_remote_code=cfg.trust_remote_code, mean=cfg.mean, std=cfg.std)
        with dist.main_first():
            decoded = decode_all(images, net.preprocessing, progress=progress)
        decoded, _ = drop_small_classes(decoded, cfg.min_per_class, any(s.split is not None for s in decoded.samples))
        samples = decoded.samples
        splits = (read_split_lists(Path(cfg.splits_from) / "splits", samples, decoded.hashes) if cfg.splits_from
                  else make_splits(samples, cfg.seed, cfg.val_fraction, cfg.test_fraction))
        labels = LabelSpace.from_labels((samples[i].label for i in splits.train), "train split")
        y = torch.as_tensor(labels.indices(s.label for s in samples)).numpy()
        net.to(device).to(memory_format=torch.channels_last)
        feats, _ = cached_features(net, fingerprint(net), decoded.pixels, decoded.hashes, net.preprocessing, device,
                                   precision.inference_dtype, progress)
        x = feats.float().numpy()
        fit = fit_probe(x[splits.train], y[splits.train], x[splits.val], y[splits.val], len(labels),
                        seed=stage_seed(cfg.seed, "probe"))
        params = sum(p.numel() for p in net.parameters())
        seconds = time.perf_counter() - t0
        scored.append(Scored.from_logits(name, fit.val_logits, float(params), seconds=round(seconds, 1),
                                         input_size=net.preprocessing.input_size, probe_C=fit.C))
        y_val = y[splits.val]
        acc = float((fit.val_logits.argmax(1) == y_val).mean())
        log(f"backbone {name}: probe val accuracy {acc:.4f} ({params / 1e6:.1f}M parameters, {seconds:.0f}s)")
        del net
    choice = choose(scored, y_val, prefer_cheaper=True, what="backbone")
    table = [{**row, "params": int(row.pop("cost"))} for row in choice.table]
    reason = choice.reason.replace("the cheapest", "the smallest")
    log(f"backbone: {reason}")
    return Ranking(choice.name, reason, table)
