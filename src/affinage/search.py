"""Training stage: run the plan's candidates on train, measure each on val, keep one (`selection.choose`).

A named strategy is a search of one candidate; `auto` tries several within its budget (`auto.py`: the order, the
budget and the early stops). What every run gets, each kept only where it helps on val and reported in the run:
the tuned probe (`probe.py`), WiSE-FT (weight-space interpolation between the probe-initialised start and the
fine-tuned weights, alpha chosen on val), flip test-time augmentation, and a refit on train + val.

The data given here have an empty test split (`run.train_model` removes it): nothing in the search can look at test.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist
from .config import TrainConfig
from .runfiles import CHECKPOINT_DIR, save_adapter
from .seeding import seeded, stage_seed
from .selection import Scored, choose

WISE_ALPHAS = (0.5, 0.75)  # besides 1.0 (the fine-tuned weights); 0.0 is the linear probe, a candidate of its own
KEEP_ALPHAS = (0.25, 0.5, 0.75)  # keeping an old task: lower alphas trade new accuracy for old (chosen on both vals)


@dataclass
class Candidate:
    name: str
    strategy: Any
    hp: dict[str, Any]
    net: Any  # ImageClassifier | None
    head: Any
    val_logits: np.ndarray
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    probe: Any = None
    fine_tune: Any = None
    row: dict[str, Any] = field(default_factory=dict)
    alpha: float | None = None
    alpha_curve: list[dict[str, Any]] | None = None  # WiSE-FT: val figures per alpha tried


@dataclass
class Outcome:
    strategy: Any
    hp: dict[str, Any]
    reason: str
    selection: dict[str, Any]
    net: Any
    head: Any
    history: list[dict[str, Any]]
    probe: Any
    fine_tune: Any
    candidates: list[dict[str, Any]]
    extras: dict[str, Any]


def run_search(cfg: TrainConfig, plan: Any, backbone: Any, data: Any, features: Any, run_dir: Path, progress: bool,
               log: Callable[[str], None]) -> Outcome:  # long-function: the search reads as one loop over candidates
    from .auto import Budget, Search, default_budget, parse_budget, predicted_epoch_seconds
    from .strategies import get_strategy

    assert not data.splits.test, "the search must not see the test split"
    train, val = data.splits.train, data.splits.val
    yv = scoring(data, np.zeros((len(val), _width(data))))[1]  # the labels selection compares on (see `scoring`)
    auto = cfg.strategy == "auto"
    fwd = _forward_seconds(backbone, data, features, plan)
    spent = backbone.seconds + data.seconds + features.seconds
    budget = Budget(parse_budget(cfg.budget) if cfg.budget else None, time.perf_counter() - spent,
                    reserve=fwd * 2 * max(len(val), len(data.decoded.samples) - len(train) - len(val)) + 10,
                    source=f"--budget {cfg.budget}" if cfg.budget else "the default budget")
    old = data.old  # keep.OldTask of an --init-from run: the sklearn probe cannot keep old rows
    wants_probe = features.values is not None and old is None and tuple(plan.candidates) != ("prototype",)
    probe = _probe(cfg, data, features, log) if wants_probe else None  # (the prototypes alone need no probe)
    if auto and not cfg.budget and not cfg.budget_factor:
        budget.seconds = default_budget(plan.device, spent + (probe.seconds if probe is not None else 0.0))
        budget.source = f"the default budget, {budget.seconds / 60:.0f} min"
    if auto and cfg.budget_factor:
        by_factor = cfg.budget_factor * (spent + (probe.seconds if probe is not None else 0.0))
        budget.seconds = min(budget.seconds, by_factor) if budget.seconds else by_factor
        budget.source = f"--budget-factor {cfg.budget_factor:g} x the probe's {by_factor / cfg.budget_factor:.0f}s"
    unfreezing = any(not get_strategy(n).uses_cached_features for n in plan.candidates)
    init = (_lp_init(cfg, backbone, data, features, run_dir, log)
            if unfreezing and features.values is not None and cfg.head_init == "probe" else None)
    search = Search(len(val), budget)
    done: list[Candidate] = []
    rows: list[dict[str, Any]] = []
    for name in plan.candidates:
        strategy = get_strategy(name)
        if old is not None:  # the head keeps the old one's architecture (its rows are the old classes)
            strategy.head_hidden = old.hidden
        hp = plan.hp if not auto else resolve_hp(cfg, strategy, backbone, len(train))
        predicted = 0.0
        if not strategy.uses_cached_features:
            size = backbone.preprocessing.input_size
            predicted = predicted_epoch_seconds(name, len(train), len(val), fwd, hp["train_image_size"], size)
            fits = dist.broadcast_object(search.fit_epochs(hp["epochs"], predicted * search.speed)) if auto else hp["epochs"]
            if fits < 1:
                rows.append({"strategy": name, "status": f"not started: one epoch (~{predicted * search.speed:.0f}s "
                             f"predicted) does not fit in the {max(0.0, budget.left()):.0f}s left of {budget.source}"})
                log(f"auto: {rows[-1]['status'].replace('not started', name + ' not started')}")
                continue
            if fits < hp["epochs"]:
                log(f"auto: {name} gets {fits} of its {hp['epochs']} epochs, what fits in the {budget.left():.0f}s left "
                    f"(~{predicted * search.speed:.0f}s per epoch predicted)")
                hp = {**hp, "epochs": fits, "epochs_shortened_from": hp["epochs"]}
        t0 = time.perf_counter()
        if name == "linear-probe" and probe is not None:
            cand = Candidate(name, strategy, hp, backbone.net, probe.head, probe.val_logits, probe.seconds,
                             _probe_rows(probe, len(train)), probe=_probe_result(probe, len(train)))
        elif name == "prototype":
            cand = _prototype_candidate(strategy, hp, backbone, data, features)
        elif strategy.uses_cached_features:
            cand = _head_candidate(cfg, strategy, hp, backbone, data, features, run_dir, log)
        else:
            stop = search.stopper(name, hp["epochs"]) if auto else None
            cand = _fine_tune_candidate(cfg, plan, strategy, hp, backbone, data, init, run_dir, progress, log,
                                        stop, several=len(plan.candidates) > 1)
        cand.seconds = probe.seconds if name == "linear-probe" and probe is not None else time.perf_counter() - t0
        if cand.fine_tune is not None:
            search.learn_speed(predicted, [r.seconds for r in cand.fine_tune.history[1:]])
        acc = float((scoring(data, cand.val_logits)[0].argmax(1) == yv).mean()) if len(yv) else 0.0
        search.record(name, acc)
        stopped = cand.fine_tune.stop_reason if cand.fine_tune is not None else None
        cand.row = {"strategy": name, "val_accuracy": round(acc, 4), "seconds": round(cand.seconds, 1),
                    "trainable_params": _trained_params(cand),
                    "epochs": hp.get("epochs"), "wise_alpha": cand.alpha,
                    "kept_epoch": cand.fine_tune.best_epoch if cand.fine_tune is not None else None,
                    "status": f"stopped early: {stopped}" if stopped else "trained"}
        log(f"candidate {name}: val accuracy {acc:.4f} in {cand.seconds:.0f}s"
            + (f" (WiSE-FT alpha {cand.alpha:g})" if cand.alpha not in (None, 1.0) else "")
            + (f"; {cand.row['status']}" if stopped else ""))
        done.append(cand)
        rows.append(cand.row)
    # where val cannot separate them, the candidate that trains the fewest parameters: the least fitted to the data
    choice = choose([Scored.from_logits(c.name, scoring(data, c.val_logits)[0], float(_trained_params(c)))
                     for c in done], yv, prefer_cheaper=True)
    winner = done[choice.index]
    for row in rows:
        scored = next((t for t in choice.table if t["name"] == row["strategy"]), None)
        if scored is not None:
            row.update(val_loss_calibrated=scored["val_loss_calibrated"], tied_on_accuracy=scored["tied_on_accuracy"],
                       chosen=scored["chosen"])
    extras = _last_points(cfg, plan, winner, backbone, data, features, probe, init, run_dir, progress, log)
    selection = {"criterion": choice.reason.split(" kept by ")[-1].split(" (")[0] if len(done) > 1 else "only one",
                 "n_val": choice.n_val, "val_accuracy_ci95": [round(v, 4) for v in choice.accuracy_ci95],
                 "budget_seconds": budget.seconds, "budget_source": budget.source if budget.seconds else None}
    reason = f"auto chose {winner.name}: {choice.reason}; {plan.reason}" if auto else plan.reason
    if auto:
        log(reason)
    start = init[1] if init is not None and winner.fine_tune is not None and winner.name != "scratch" else None
    history = (start.as_rows() if start is not None else []) + winner.history
    return Outcome(winner.strategy, winner.hp, reason, selection, extras.pop("net", winner.net),
                   extras.pop("head", winner.head), history, winner.probe or start, winner.fine_tune, rows, extras)


def _lp_init(cfg: TrainConfig, backbone: Any, data: Any, features: Any, run_dir: Path,
             log: Callable[[str], None]) -> tuple[Any, Any]:
    """The head fine-tuning starts from (LP-FT): a linear head trained on the frozen features with the loss fine-tuning
    then uses (label smoothing included). The tuned probe's own head, fitted without it, is sharper than that loss
    wants: on oxford17, fine-tuning from it first lost val accuracy (0.95 -> 0.935) where this start gains."""
    from .strategies import get_strategy

    num_features = backbone.net.num_features if backbone.net is not None else backbone.card.num_features
    hp = get_strategy("linear-probe").resolve(TrainConfig(data=cfg.data, seed=cfg.seed))
    old = data.old
    head = _imprinted(task_head(cfg, num_features, data, old.hidden if old is not None else None, backbone.net),
                      data, features)
    return fit_head(cfg, hp, head, features, data, run_dir, "head-init", log)


def _imprinted(head: Any, data: Any, features: Any) -> Any:
    """--init-from: the new classes' rows imprinted from their training features (keep.imprint)."""
    from .keep import imprint

    old = data.old
    if old is None or features.values is None:
        return head
    train = data.splits.train
    return imprint(head, features.values[train], data.y[train], old.n_old)


# ----------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------
def _probe(cfg: TrainConfig, data: Any, features: Any, log: Callable[[str], None]) -> Any:
    from .balance import probe_class_weight
    from .probe import fit_probe

    train, val = data.splits.train, data.splits.val
    feats = features.values.float().numpy()
    if data.tasks is not None:  # one tuned probe per task, on its known labels
        from .tasks import fit_probes

        head, logits, cs, first = fit_probes(fit_probe, data.tasks, feats, train, val, stage_seed(cfg.seed, "probe"))
        fit = replace(first, head=head, val_logits=logits, task_C=cs)
        log("probe on frozen features, one per task: C " + ", ".join(f"{t} {c:g}" for t, c in cs.items())
            + " chosen on val")
        return fit
    fit = fit_probe(feats[train], data.y[train], feats[val], data.y[val], len(data.labels),
                    seed=stage_seed(cfg.seed, "probe"), class_weight=probe_class_weight(cfg.balance))
    log(f"probe on frozen features: C={fit.C:g} chosen on val (val accuracy "
        f"{next(r['val_accuracy'] for r in fit.choice.table if r['chosen']):.3f}, {len(fit.choice.table)} C values, "
        f"{fit.seconds:.1f}s)")
    return fit


def _probe_rows(probe: Any, n_train: int) -> list[dict[str, Any]]:
    return [r for r in _probe_result(probe, n_train).as_rows()]


def _probe_result(probe: Any, n_train: int) -> Any:
    """The probe's C table as a FitResult: one row per C tried ("epoch" = its index in the grid)."""
    from .train import EpochRecord, FitResult

    trainable = sum(p.numel() for p in probe.head.parameters())
    history = [EpochRecord("probe", k, None, None, r["val_loss_calibrated"], r["val_accuracy"], 0.0, trainable, 0.0)
               for k, r in enumerate(probe.choice.table)]
    return FitResult(history, best_epoch=probe.choice.index, best_val_accuracy=probe.choice.table[probe.choice.index]
                     ["val_accuracy"], train_seconds=probe.seconds, samples_seen=n_train * len(history))


def _head_candidate(cfg: TrainConfig, strategy: Any, hp: dict[str, Any], backbone: Any, data: Any, features: Any,
                    run_dir: Path, log: Callable[[str], None]) -> Candidate:
    num_features = backbone.net.num_features if backbone.net is not None else backbone.card.num_features
    head = _imprinted(task_head(cfg, num_features, data, strategy.head_hidden, backbone.net), data, features)
    head, result = fit_head(cfg, hp, head, features, data, run_dir, "head", log)
    with torch.no_grad():
        logits = head(features.values[data.splits.val].float()).numpy()
    return Candidate(strategy.name, strategy, hp, backbone.net, head, logits, 0.0, result.as_rows(), probe=result)


def _prototype_candidate(strategy: Any, hp: dict[str, Any], backbone: Any, data: Any, features: Any) -> Candidate:
    """The nearest-class-mean classifier on the frozen features (fewshot.py), its temperature chosen on val."""
    from .errors import AffinageError
    from .fewshot import fit_prototype
    from .train import EpochRecord, FitResult

    if data.old is not None:
        raise AffinageError("the prototype classifier cannot keep an old task's classes (--init-from)",
                            "use --strategy linear-probe or head with --init-from")
    train, val = data.splits.train, data.splits.val
    feats = features.values.float().numpy()
    fit = fit_prototype(feats[train], data.y[train], feats[val], data.y[val], len(data.labels))
    yv = data.y[val]
    acc = float((fit.val_logits.argmax(1) == yv).mean()) if len(yv) else 0.0
    loss = -float(Scored.from_logits("", fit.val_logits).log_probs[np.arange(len(yv)), yv].mean()) if len(yv) else 0.0
    params = sum(p.numel() for p in fit.head.parameters())
    result = FitResult([EpochRecord("prototype", 0, None, None, loss, acc, 0.0, params, fit.seconds)], 0, acc,
                       train_seconds=fit.seconds, samples_seen=len(train))
    return Candidate(strategy.name, strategy, {**hp, "temperature": round(fit.temperature, 4)}, backbone.net, fit.head,
                     fit.val_logits, fit.seconds, result.as_rows(), probe=result)


def _fine_tune_candidate(cfg: TrainConfig, plan: Any, strategy: Any, hp: dict[str, Any], backbone: Any, data: Any,
                         init: Any, run_dir: Path, progress: bool, log: Callable[[str], None], stop: Any,
                         several: bool) -> Candidate:
    """LP-FT: a linear head fitted on the frozen features, then fine-tuning; then WiSE-FT's alpha chosen on val."""
    net = _start_net(cfg, strategy, backbone, data, init, several)
    start = copy.deepcopy(net.state_dict())
    plan = replace(plan, strategy=strategy, hp=hp)
    checkpoint = "fine-tune.pt" if not several else f"fine-tune-{strategy.name.replace(':', '')}.pt"
    net, result = fine_tune(cfg, plan, net, data, run_dir, progress, log, stop=stop, checkpoint=checkpoint)
    logits = _val_logits(plan, net, data, False)
    alpha, curve = 1.0, None
    if cfg.interpolate != "none" and strategy.name != "scratch" and result.best_epoch > 0:
        alpha, logits, curve = _choose_alpha(cfg, plan, net, start, data, logits, log)
    return Candidate(strategy.name, strategy, hp, net, net.head, logits, 0.0, result.as_rows(), fine_tune=result,
                     alpha=alpha, alpha_curve=curve)


def _start_net(cfg: TrainConfig, strategy: Any, backbone: Any, data: Any, init: Any, several: bool) -> Any:
    from .backbones import create_model

    if strategy.name == "scratch":  # same architecture, random weights: is transfer helping at all?
        with seeded(cfg.seed, "scratch"):
            net = create_model(cfg.model, num_classes=len(data.labels), pretrained=False, image_size=cfg.image_size,
                               trust_remote_code=cfg.trust_remote_code, mean=cfg.mean, std=cfg.std)
        net.set_head(net.task, task_head(cfg, net.num_features, data, None, None, "head-random"), None,
                     head_labels(data))
        return net
    net = copy.deepcopy(backbone.net) if several else backbone.net
    if cfg.head_init == "random" or init is None:
        head = task_head(cfg, net.num_features, data, strategy.head_hidden, None, "head-random")
    else:
        head = copy.deepcopy(init[0])
    net.set_head(net.task, head, strategy.head_hidden, head_labels(data))
    return net


def _choose_alpha(cfg: TrainConfig, plan: Any, net: Any, start: dict[str, Any], data: Any, tuned: np.ndarray,
                  log: Callable[[str], None]) -> tuple[float, np.ndarray, list[dict[str, Any]]]:
    """WiSE-FT: theta(alpha) = (1 - alpha) * start + alpha * fine-tuned, alpha in WISE_ALPHAS or 1, chosen on val
    (`--interpolate ALPHA` forces one). A run that keeps an old task with old data maximises the mean of the old-data
    and the new-data val accuracy over alpha in KEEP_ALPHAS and 1 (the guides' balance of the two tasks); returns the
    alpha, its val logits and the curve (one row per alpha)."""
    from .keep import both_tasks_accuracy

    end = copy.deepcopy(net.state_dict())
    old, is_old = data.old, data.is_old
    both = old is not None and is_old is not None and is_old[data.splits.val].any() and (~is_old[data.splits.val]).any()
    grid = KEEP_ALPHAS if both else WISE_ALPHAS
    alphas = [float(cfg.interpolate)] if cfg.interpolate not in ("auto", "none") else list(grid)
    yv = scoring(data, tuned)[1]
    logits = {1.0: tuned}
    for a in alphas:
        net.load_state_dict(_mix(start, end, a))
        logits[a] = _val_logits(plan, net, data, False)
    curve = [{"alpha": a, "val_accuracy": float((scoring(data, lg)[0].argmax(1) == yv).mean()),
              **(both_tasks_accuracy(lg, yv, is_old[data.splits.val]) if both else {})}
             for a, lg in sorted(logits.items())]
    if cfg.interpolate not in ("auto", "none"):
        alpha, why = float(cfg.interpolate), f"--interpolate {cfg.interpolate}"
    elif both:  # the highest mean of the two tasks' val accuracy; ties to the larger alpha (the fine-tuned side)
        best = max(curve, key=lambda r: (round(r["mean"], 6), r["alpha"]))
        alpha, why = best["alpha"], (f"mean of old ({best['old_accuracy']:.3f}) and new ({best['new_accuracy']:.3f}) "
                                     f"val accuracy {best['mean']:.3f}, the highest over alpha")
    else:
        pick = choose([Scored.from_logits(f"{a:g}", scoring(data, lg)[0]) for a, lg in sorted(logits.items(),
                                                                                           reverse=True)], yv)
        alpha, why = float(pick.name), pick.reason.split(" kept by ")[-1]
    net.load_state_dict(_mix(start, end, alpha))
    log(f"  WiSE-FT: alpha {alpha:g} kept ({why})")
    return alpha, logits[alpha], curve


def _mix(start: dict[str, Any], end: dict[str, Any], alpha: float) -> dict[str, Any]:
    return {k: (torch.lerp(start[k], v, alpha) if v.is_floating_point() and k in start else v)
            for k, v in end.items()}


# ----------------------------------------------------------------------------------------------
# After the choice: flip TTA and refit, each kept where val says so
# ----------------------------------------------------------------------------------------------
def _last_points(cfg: TrainConfig, plan: Any, winner: Candidate, backbone: Any, data: Any, features: Any,
                 probe: Any, init: Any, run_dir: Path, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    plan = replace(plan, strategy=winner.strategy, hp=winner.hp)
    yv = scoring(data, winner.val_logits)[1]
    extras: dict[str, Any] = {"wise_alpha": winner.alpha, "wise_curve": winner.alpha_curve, "probe_C": probe.C if probe is not None else None,
                              "probe_grid": probe.choice.table if probe is not None else None}
    logits, tta = winner.val_logits, False
    net = winner.net
    logits = _new_class_offset(winner, data, logits, extras, log)
    if cfg.tta != "off" and net is not None:
        flipped = split_logits(plan, net, winner.head, data, features, data.splits.val, True, False)
        if cfg.tta == "on":
            tta = True
        else:
            pick = choose([Scored.from_logits("plain", scoring(data, logits)[0], 1.0),
                           Scored.from_logits("flip", scoring(data, flipped)[0], 2.0)], yv, prefer_cheaper=True)
            tta = pick.name == "flip"
        extras["tta_reason"] = "--tta on" if cfg.tta == "on" else pick.reason
        logits = flipped if tta else logits
        log(f"flip TTA: {'kept' if tta else 'not kept'} ({extras['tta_reason'].split(' kept by ')[-1]})")
    else:
        extras["tta_reason"] = "--tta off" if cfg.tta == "off" else "needs the network (cached-card run)"
    extras["tta"] = tta
    from .selection import calibrated_nll

    rows = scoring(data, logits)[0]
    nll, _ = calibrated_nll(Scored.from_logits("", rows).log_probs, yv)
    extras["val"] = {"accuracy": float((rows.argmax(1) == yv).mean()) if len(yv) else None,
                     "loss_calibrated": float(nll.mean()) if len(yv) else None, "n": len(yv)}
    extras["val_logits"] = logits
    cheap = (winner.name == "linear-probe" and probe is not None) or winner.name == "prototype"
    refit = cfg.refit == "on" or (cfg.refit == "auto" and cheap)
    extras["refit"] = False
    if refit and winner.name == "prototype":
        from .fewshot import prototype_head

        feats = features.values.float().numpy()
        both = list(data.splits.train) + list(data.splits.val)
        extras["head"] = prototype_head(feats[both], data.y[both], len(data.labels), winner.hp["temperature"])
        extras["refit"] = True
        log(f"refit: the prototypes computed again on train + val ({len(both)} images; temperature "
            f"{winner.hp['temperature']:g}, chosen on val)")
    elif refit and winner.name == "linear-probe" and probe is not None:
        from .balance import probe_class_weight
        from .probe import refit_probe

        feats = features.values.float().numpy()
        both = list(data.splits.train) + list(data.splits.val)
        if data.tasks is not None:
            from .tasks import refit_probes

            extras["head"] = refit_probes(refit_probe, data.tasks, feats, both, probe.task_C,
                                          stage_seed(cfg.seed, "probe"))
        else:
            extras["head"] = refit_probe(probe.C, feats[both], data.y[both], len(data.labels),
                                         stage_seed(cfg.seed, "probe"), probe_class_weight(cfg.balance))
        extras["refit"] = True
        log(f"refit: the probe (C={probe.C:g}, chosen on val) fitted again on train + val ({len(both)} images)")
    elif refit and winner.fine_tune is not None:
        extras.update(_refit_fine_tune(cfg, plan, winner, backbone, data, init, run_dir, progress, log))
    extras["refit_reason"] = ("--refit off" if cfg.refit == "off" else
                              "on by default for the probe (cheap; C chosen on val)" if winner.name == "linear-probe"
                              else "on by default for the prototypes (cheap; temperature chosen on val)"
                              if winner.name == "prototype"
                              else "--refit on" if cfg.refit == "on" else
                              "off by default for strategies that train the backbone (a second training); --refit on")
    return extras


def _new_class_offset(winner: Candidate, data: Any, logits: np.ndarray, extras: dict[str, Any],
                      log: Callable[[str], None]) -> np.ndarray:
    """--init-from with old images in val: the new classes' logit offset chosen on val (keep.new_class_offset),
    added to the kept head's bias; the val logits with it."""
    from .keep import add_new_class_offset, new_class_offset

    old, is_old = data.old, data.is_old
    if old is None or is_old is None or winner.head is None:
        return logits
    flags = is_old[data.splits.val]
    if not flags.any() or flags.all():
        return logits
    delta, curve = new_class_offset(logits, data.y[data.splits.val], flags, old.n_old)
    extras.update(new_class_offset=delta, new_class_offset_curve=curve)
    if delta:
        add_new_class_offset(winner.head, old.n_old, delta)
        logits = logits.copy()
        logits[:, old.n_old:] += delta
    row = next(r for r in curve if r["offset"] == delta)
    log(f"new classes' logit offset {delta:+g} chosen on val (old {row['old_accuracy']:.3f}, new "
        f"{row['new_accuracy']:.3f} val accuracy)")
    return logits


def _refit_fine_tune(cfg: TrainConfig, plan: Any, winner: Candidate, backbone: Any, data: Any, init: Any,
                     run_dir: Path, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The kept configuration trained again from the same start on train + val, for the epochs val chose."""
    from .data import Splits

    epochs = max(1, winner.fine_tune.best_epoch)
    both = list(data.splits.train) + list(data.splits.val)
    merged = replace(data, splits=Splits(both, list(data.splits.val), [], data.splits.how))
    hp = {**winner.hp, "epochs": epochs, "patience": epochs + 1}
    plan = replace(plan, hp=hp)
    net = _start_net(cfg, winner.strategy, backbone, data, init, True)
    start = copy.deepcopy(net.state_dict())
    log(f"refit: {winner.name} again on train + val ({len(both)} images) for {epochs} epoch(s); its val figures are "
        "on images it trains on")
    net, _ = fine_tune(cfg, plan, net, merged, run_dir, progress, log, checkpoint="refit.pt")
    if winner.alpha not in (None, 1.0):
        net.load_state_dict(_mix(start, copy.deepcopy(net.state_dict()), winner.alpha))
    return {"net": net, "head": net.head, "refit": True}


# ----------------------------------------------------------------------------------------------
# Logits on a split (val during the search; test once, in run.evaluate_model)
# ----------------------------------------------------------------------------------------------
def split_logits(plan: Any, net: Any, head: Any, data: Any, features: Any, indices: list[int], flip: bool,
                 progress: bool) -> np.ndarray:
    """Logits of the model on `indices`: the head on cached features for frozen strategies (flip: features of the
    mirrored images), the whole network otherwise; with `flip`, the mean of the plain and mirrored probabilities."""
    from .inference import run_batches

    frozen = plan.strategy.uses_cached_features
    cached = frozen and features is not None and features.values is not None
    if cached and not flip:
        with torch.no_grad():
            return head(features.values[indices].float()).numpy()
    model = net.to(plan.device).to(memory_format=torch.channels_last)
    model.eval()
    head = head.to(plan.device)
    onnx = plan.runtime if frozen and plan.runtime is not None and plan.runtime.name == "onnx" else None
    if cached:  # flip on a frozen backbone: only the mirrored images need a forward pass, the plain ones are cached
        with torch.no_grad():
            if onnx is not None:  # the same runtime as the cached features
                mirrored = onnx.features_of(data.decoded.pixels, indices, flip=True, progress=progress)
            else:
                mirrored = run_batches(lambda x: model.forward_features(x.flip(3)).float(), data.decoded.pixels,
                                       indices, net.preprocessing, plan.device, plan.precision.inference_dtype,
                                       progress=progress)
            head_cpu = head.cpu()
            probs = (torch.softmax(head_cpu(features.values[indices].float()), 1)
                     + torch.softmax(head_cpu(mirrored.float()), 1)) / 2
        net.cpu()
        return torch.log(probs.clamp_min(1e-12)).numpy()

    if onnx is not None:  # no cached features at hand (val during the search): the runtime's, plain and mirrored
        with torch.no_grad():
            head_cpu = head.cpu()
            probs = [torch.softmax(head_cpu(onnx.features_of(data.decoded.pixels, indices, flip=f).float()), 1)
                     for f in ((False, True) if flip else (False,))]
        net.cpu()
        return torch.log((sum(probs) / len(probs)).clamp_min(1e-12)).numpy()  # type: ignore[union-attr]

    def frozen_logits(x: torch.Tensor) -> torch.Tensor:
        return head(model.forward_features(x).float())

    with torch.no_grad():
        logits = run_batches(frozen_logits if frozen else model, data.decoded.pixels, indices, net.preprocessing,
                             plan.device, plan.precision.inference_dtype, progress=progress, flip_tta=flip)
    net.cpu()
    head.cpu()
    return logits.float().numpy()


def _val_logits(plan: Any, net: Any, data: Any, flip: bool) -> np.ndarray:
    return split_logits(plan, net, net.head, data, None, data.splits.val, flip, False)


def _forward_seconds(backbone: Any, data: Any, features: Any, plan: Any) -> float:
    """Seconds per image of one forward pass at the checkpoint's size: from the feature extraction when this run
    computed the features, else timed on a few val images."""
    from .inference import run_batches

    n = len(data.decoded.samples)
    if features.values is not None and features.cached is False and n:
        return features.seconds / n
    if backbone.net is None:
        return 0.0
    sample = list(data.splits.val[:16]) or list(data.splits.train[:16])
    net = backbone.net.to(plan.device).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        run_batches(net.forward_features, data.decoded.pixels, sample, backbone.preprocessing, plan.device,
                    plan.precision.inference_dtype, progress=False, sharded=False)
    net.cpu()
    return (time.perf_counter() - t0) / max(1, len(sample))


def resolve_hp(cfg: TrainConfig, strategy: Any, backbone: Any, n_train: int) -> dict[str, Any]:
    """The strategy's effective hyper-parameters (the user's where given), with the training image size."""
    hp = strategy.resolve(cfg, n_train)
    if not strategy.uses_cached_features:
        net, pp = backbone.net, backbone.preprocessing
        hp["train_image_size"] = cfg.train_image_size or (_round_to(pp.input_size * 0.8, 16) if net.flexible_input_size
                                                          else pp.input_size)
    return hp


def _trained_params(c: Candidate) -> int:
    if c.fine_tune is not None and c.fine_tune.history:
        return max(r.trainable_params for r in c.fine_tune.history)
    return sum(p.numel() for p in c.head.parameters())


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


# ----------------------------------------------------------------------------------------------
# Training pieces: a head on features, fine-tuning on images
# ----------------------------------------------------------------------------------------------
def scoring(data: Any, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The val logits and labels that selection compares: one row per val image, or with several tasks one row per
    known (image, task) label (tasks.TaskSet.scoring_rows)."""
    val = data.splits.val
    if data.tasks is None:
        return logits, data.y[val]
    return data.tasks.scoring_rows(logits, data.tasks.y[val])


def _width(data: Any) -> int:
    return sum(data.tasks.sizes) if data.tasks is not None else len(data.labels)


def targets_of(data: Any) -> np.ndarray:
    """What the training loop's labels are: the class index per sample, or per sample and task."""
    return data.tasks.y if data.tasks is not None else data.y


def head_labels(data: Any) -> Any:
    """The label space `set_head` checks a head against (None for a MultiHead: its tasks carry theirs)."""
    return None if data.tasks is not None else data.labels


def _objective(data: Any, cfg: TrainConfig, module: Any, loss: Any) -> dict[str, Any]:
    """LoopSettings' loss and objective: the tasks' (several labels per image), else the given loss."""
    if data.tasks is None:
        return {"loss": loss}
    from .tasks import TaskObjective

    objective = TaskObjective(data.tasks, cfg.label_smoothing).bind(module)
    return {"loss": objective.loss, "objective": objective}


def task_head(cfg: TrainConfig, num_features: int, data: Any, hidden: int | None, net: Any,
              stage: str = "head") -> Any:
    """`new_head` for the data's task, or a MultiHead of one such head per task."""
    if data.tasks is None:
        return new_head(cfg, num_features, data.labels, hidden, net, stage)
    from .tasks import make_multihead

    return make_multihead(data.tasks, lambda space: new_head(cfg, num_features, space, hidden, None, f"{stage}-{space.task}"))


def new_head(cfg: TrainConfig, num_features: int, labels: Any, hidden: int | None, net: Any,
             stage: str = "head") -> Any:
    """A fresh head for the task, seeded for its own stage; a starting run's head when its label space is the same
    (a run continued on the same classes keeps what it learned), or its rows followed by fresh ones when the label
    space starts with its classes (`--init-from`: old classes kept, new ones added; keep.extend_head)."""
    from .backbones import make_head
    from .keep import extend_head

    with seeded(cfg.seed, stage):
        head = make_head(num_features, len(labels), hidden)
    start = getattr(net, "pretrained_head", None) if net is not None else None
    if start is not None and start.hidden == hidden:
        n_old = len(start.labels.classes)
        if start.labels.classes == labels.classes:
            head.load_state_dict(start.layer.state_dict())
        elif tuple(labels.classes[:n_old]) == tuple(start.labels.classes):
            extend_head(head, start.layer, n_old)
    return head


def fit_head(cfg: TrainConfig, hp: dict[str, Any], head: Any, features: Any, data: Any, run_dir: Path, phase: str,
             log: Callable[[str], None]) -> tuple[Any, Any]:
    """Train a head (the MLP of strategy `head`) on the cached features with AdamW, early-stopped on val."""
    from .keep import training_parts
    from .strategies import decay_groups
    from .train import LoopSettings, fit

    feats, y = features.values.float(), torch.as_tensor(targets_of(data))
    tensors = {name: torch.utils.data.TensorDataset(feats[idx], y[idx]) for name, idx in data.splits.items()}
    groups = decay_groups("head", list(head.named_parameters()), hp["lr"], hp["weight_decay"])
    old = data.old  # on cached features the old head alone is the teacher (the backbone is frozen)
    sampler, loss = training_parts(old, data.splits.train, data.is_old, hp["batch_size"],
                                   old.head if old is not None else None, cfg.label_smoothing)
    weights, sampler = _balanced(cfg, data, data.splits.train, hp["batch_size"], sampler)
    result = fit(head, tensors["train"], tensors["val"], groups,
                 LoopSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], warmup_epochs=cfg.warmup_epochs,
                              patience=hp["patience"], num_workers=0, phase=phase, progress=False,
                              checkpoint=run_dir / CHECKPOINT_DIR / f"{phase}.pt", checkpoint_every=10.0,
                              distributed=False, label_smoothing=cfg.label_smoothing,
                              seed=stage_seed(cfg.seed, phase), precision=_precision(), grad_accum=cfg.grad_accum,
                              checkpoint_key=data.key, batch_sampler=sampler, class_weights=weights,
                              **_objective(data, cfg, head, loss),
                              val_weights=_val_weights(cfg, data, old, data.splits.val)),
                 log=log)
    head = head.to(torch.device("cpu")).to(memory_format=torch.contiguous_format)
    log(f"head on frozen features: val accuracy {result.best_val_accuracy:.3f} (epoch {result.best_epoch})")
    return head, result


def _balanced(cfg: TrainConfig, data: Any, train: Sequence[int], batch_size: int, sampler: Any) -> tuple[Any, Any]:
    """--balance: (the loss's class weights, the batch sampler): weights, or a class-balanced sampler (balance.py)."""
    from .balance import balanced_batches, loss_weights

    y = data.y[list(train)]
    return loss_weights(cfg.balance, y, len(data.labels)), balanced_batches(cfg.balance, y, batch_size) or sampler


def _val_weights(cfg: TrainConfig, data: Any, old: Any, val: Sequence[int]) -> Any:
    """The val weights of the loop: --init-from's (both tasks count equally), --balance's (balanced accuracy: every
    class counts equally), or None (plain accuracy)."""
    from .balance import balanced_val_weights
    from .keep import val_weights

    keep = val_weights(old, val, data.is_old)
    return keep if keep is not None else balanced_val_weights(cfg.balance, data.y[list(val)])


def _precision() -> Any:
    from .inference import Precision

    return Precision("no", "fp32")  # a head on features: milliseconds per epoch, nothing to gain from autocast


def fine_tune(cfg: TrainConfig, plan: Any, net: Any, data: Any, run_dir: Path, progress: bool,
              log: Callable[[str], None], stop: Any = None, checkpoint: str = "fine-tune.pt") -> tuple[Any, Any]:
    """Train the blocks the strategy unfreezes (and the head) on augmented images; LoRA merges its adapters."""
    from .data import PixelDataset, eval_transform, train_transform
    from .keep import Teacher, training_parts
    from .strategies import set_norms_eval
    from .train import LoopSettings, default_workers, fit

    strategy, hp, pp, splits, y = plan.strategy, plan.hp, net.preprocessing, data.splits, data.y
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers()
    train_size = hp["train_image_size"] if hp["train_image_size"] != pp.input_size else None
    y = targets_of(data)  # (samples,) or, with several tasks, (samples, tasks)
    train_ds = PixelDataset(data.decoded.pixels, splits.train, list(y[splits.train]),
                            train_transform(pp, hp["augment"], train_size))
    val_ds = PixelDataset(data.decoded.pixels, splits.val, list(y[splits.val]), eval_transform(pp))
    old = data.old
    teacher = Teacher(net, old.head) if old is not None and old.distill and strategy.name != "scratch" else None
    sampler, loss = training_parts(old, splits.train, data.is_old, hp["batch_size"], teacher,
                                   cfg.label_smoothing)
    weights, sampler = _balanced(cfg, data, splits.train, hp["batch_size"], sampler)
    module = strategy.wrap(net, hp)
    groups = strategy.param_groups(module, hp)
    strategy.apply(module, 0, hp["epochs"])
    result = fit(module, train_ds, val_ds, groups,
                 LoopSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], warmup_epochs=cfg.warmup_epochs,
                              patience=hp["patience"], num_workers=workers, phase="fine-tune", progress=progress,
                              checkpoint=run_dir / CHECKPOINT_DIR / checkpoint, label_smoothing=cfg.label_smoothing,
                              seed=stage_seed(cfg.seed, "fine-tune"), precision=plan.precision,
                              grad_accum=cfg.grad_accum, checkpoint_key=data.key + strategy.name, stop=stop,
                              batch_sampler=sampler, class_weights=weights, **_objective(data, cfg, module, loss),
                              val_weights=_val_weights(cfg, data, old, splits.val)),
                 on_epoch_start=lambda e: strategy.apply(module, e, hp["epochs"]),
                 after_train_mode=lambda m: set_norms_eval(m, not cfg.train_bn_stats), log=log)
    if module is not net:  # LoRA: keep the adapter (with its head) as peft saves it, then merge for inference
        if dist.is_main():
            save_adapter(run_dir, module)
        net = strategy.unwrap(module)
    return net, result
