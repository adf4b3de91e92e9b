"""`--strategy auto` by measurement: the test split is used once, by the winner; the choice is made on val with a
rule small val splits can bear; the tuned probe contains scikit-learn's; budget, WiSE-FT and TTA behave."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from affinage import search
from affinage.auto import parse_budget
from affinage.errors import AffinageError
from affinage.probe import fit_probe
from affinage.run import Run, finetune
from affinage.selection import Scored, choose


def _quiet(_: str) -> None:
    pass


def test_test_split_is_evaluated_once_by_the_winner_only(tmp_path, tiny_images, tiny_timm, monkeypatch):
    calls: list[tuple[str, list[int]]] = []
    real = search.split_logits

    def spy(plan, net, head, data, features, indices, flip, progress):
        calls.append((plan.strategy.name, list(indices)))
        return real(plan, net, head, data, features, indices, flip, progress)

    monkeypatch.setattr(search, "split_logits", spy)
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="auto", out=tmp_path / "run", progress=False,
                   log=_quiet, candidates=["linear-probe", "head", "partial:1"], epochs=2, batch_size=8, tta="on")
    metrics = run.metrics
    names = [c["strategy"] for c in metrics["candidates"]]
    assert names == ["linear-probe", "head", "partial:1"]  # every candidate was measured...
    assert all("val_accuracy" in c for c in metrics["candidates"])
    val = {tuple(idx) for name, idx in calls[:-1]}
    assert len(val) == 1  # ...on val only: every call but the last saw the same images
    last_name, test_idx = calls[-1]
    assert last_name == metrics["strategy"] and not set(test_idx) & set(next(iter(val)))  # the last: the winner, on test
    assert len(test_idx) == metrics["test"]["n"]
    assert sum(c.get("chosen", False) for c in metrics["candidates"]) == 1
    chosen = next(c for c in metrics["candidates"] if c.get("chosen"))
    assert chosen["strategy"] == metrics["strategy"]
    assert (run.path / "val_predictions.csv").is_file()


def test_small_val_ties_go_to_the_lower_calibrated_loss():
    y = np.array([0, 1] * 10)
    sharp = np.where(np.eye(2)[y] > 0, 4.0, -4.0)  # right, confident
    vague = np.where(np.eye(2)[y] > 0, 0.2, -0.2)  # right, unsure; same accuracy
    wrong_once = sharp.copy()
    wrong_once[0] = -wrong_once[0]
    choice = choose([Scored.from_logits("vague", vague), Scored.from_logits("sharp", sharp)], y)
    assert choice.name == "sharp" and all(r["tied_on_accuracy"] for r in choice.table)
    # one error in 20 is within two paired standard errors: still a tie, decided by loss, not by the error count
    tied = choose([Scored.from_logits("wrong_once", wrong_once), Scored.from_logits("vague", vague)], y)
    assert tied.table[0]["tied_on_accuracy"] and tied.table[1]["tied_on_accuracy"]
    # on a large val split accuracy separates: 10% more errors loses whatever its loss
    y_big = np.array([0, 1] * 500)
    good = np.where(np.eye(2)[y_big] > 0, 0.3, -0.3)
    bad = np.where(np.eye(2)[y_big] > 0, 5.0, -5.0)
    bad[:100] = -bad[:100]
    big = choose([Scored.from_logits("bad", bad), Scored.from_logits("good", good)], y_big)
    assert big.name == "good" and not big.table[0]["tied_on_accuracy"]


def test_cheaper_wins_where_val_cannot_separate():
    y = np.array([0, 1] * 10)
    same = np.where(np.eye(2)[y] > 0, 2.0, -2.0)
    noisy = same.copy()
    noisy[0] = -noisy[0]  # one error more in 20: within noise of the bigger one
    choice = choose([Scored.from_logits("big", same, cost=100.0), Scored.from_logits("small", noisy, cost=5.0)], y,
                    prefer_cheaper=True)
    assert choice.name == "small" and "cheapest" in choice.reason


def test_tuned_probe_contains_scikit_learns_default_probe():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    x = np.concatenate([c + 1.5 * rng.normal(size=(60, 32)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(4), 60)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    tr, va = slice(0, 160), slice(160, 240)
    fit = fit_probe(x[tr], y[tr], x[va], y[va], 4, grid=(0.1, 1.0, 10.0))
    plain = LogisticRegression(max_iter=3000).fit(x[tr], y[tr])
    row = next(r for r in fit.choice.table if r["name"] == "C=1")
    assert row["val_accuracy"] == pytest.approx(plain.score(x[va], y[va]), abs=1e-9)
    kept = fit.choice.table[fit.choice.index]
    assert kept["val_accuracy"] >= row["val_accuracy"] - 0.05
    # the head is the fitted regression: the same predictions through torch
    with torch.no_grad():
        head_pred = fit.head(torch.as_tensor(x[va])).argmax(1).numpy()
    assert (head_pred == fit.val_logits.argmax(1)).all()


def test_binary_probe_head_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 8)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=80) > 0).astype(int)
    fit = fit_probe(x[:60], y[:60], x[60:], y[60:], 2, grid=(1.0,))
    plain = LogisticRegression(max_iter=3000).fit(x[:60], y[:60])
    with torch.no_grad():
        probs = torch.softmax(fit.head(torch.as_tensor(x[60:])), 1).numpy()
    assert np.allclose(probs, plain.predict_proba(x[60:]), atol=1e-4)


def test_budget_parsing_and_refusal():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("1.5h") == 5400
    assert parse_budget(None) is None
    with pytest.raises(AffinageError, match="not a duration"):
        parse_budget("ten minutes")


def test_a_spent_budget_starts_no_unfreezing_candidate_and_says_so(tmp_path, tiny_images, tiny_timm):
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="auto", out=tmp_path / "run", progress=False,
                   log=_quiet, candidates=["linear-probe", "full"], budget="1s")
    rows = {c["strategy"]: c for c in run.metrics["candidates"]}
    assert rows["full"]["status"].startswith("not started")
    assert run.metrics["strategy"] == "linear-probe"
    assert run.metrics["strategy_evidence"]["selection"]["budget_seconds"] == 1.0


def test_wise_mix_interpolates_floats_only():
    start = {"w": torch.zeros(3), "n": torch.tensor(1)}
    end = {"w": torch.ones(3), "n": torch.tensor(5)}
    assert torch.equal(search._mix(start, end, 0.0)["w"], torch.zeros(3))
    assert torch.allclose(search._mix(start, end, 0.25)["w"], torch.full((3,), 0.25))
    assert search._mix(start, end, 0.25)["n"] == 5  # counters are not averaged


@pytest.mark.parametrize("strategy, options", [("partial:1", {}), ("linear-probe", {"runtime": "onnx"})])
def test_kept_tta_is_saved_and_used_by_predict(tmp_path, tiny_images, tiny_timm, monkeypatch, strategy, options):
    """Frozen backbones: the mirrored images' features beside the cached plain ones (in the features' runtime)
    give what predict gives through the whole model."""
    import csv

    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "cache"))  # a cold cache: the network is built
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy=strategy, out=tmp_path / "run",
                   progress=False, log=_quiet, epochs=1, batch_size=8, tta="on", **options)
    info = json.loads((run.path / "model" / "model.json").read_text())
    assert info["extra"]["tta"] is True
    reloaded = Run.load(run.path)
    assert reloaded.tta
    with open(run.path / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    results = reloaded.predict([r["path"] for r in rows], top_k=1)
    for result, row in zip(results, rows):
        assert result["label"] == row["predicted"]
        assert result["probability"] == pytest.approx(float(row["probability"]), abs=1e-3)


def test_reproducing_an_auto_run_replays_its_winner_identically(tmp_path, tiny_images, tiny_timm):
    from affinage.reproduce import reproduce

    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="auto", out=tmp_path / "run", progress=False,
                   log=_quiet, candidates=["head", "partial:1"], epochs=2, batch_size=8, budget="1h")
    result = reproduce(run.path, out=tmp_path / "again", progress=False, log=_quiet)
    assert result["identical"], result["differences"]
    assert Run.load(tmp_path / "again").metrics["strategy"] == run.metrics["strategy"]


def test_halving_compares_candidates_at_equal_points_of_their_schedules():
    """A half-trained network is held against another at half its schedule, never against the finished probe."""
    import time

    from affinage.auto import Budget, Search

    s = Search(n_val=200, budget=Budget(None, time.perf_counter()))
    s.record("linear-probe", 0.97)  # finished frozen candidate: not a rung
    first = s.stopper("progressive", 12)
    assert first(5, 1.0, 0.80, 1.0) is None  # not yet at its rung
    assert first(6, 1.0, 0.85, 1.0) is None  # at its rung, far below the probe, but nothing to compare with
    second = s.stopper("full", 6)
    assert second(3, 1.0, 0.84, 1.0) is None  # within two standard errors of progressive's 0.85 at its rung
    third = s.stopper("scratch", 10)
    why = third(5, 1.0, 0.70, 1.0)
    assert why is not None and "progressive" in why and "0.850" in why
    short = s.stopper("partial:2", 4)  # a short schedule always completes
    assert short(2, 1.0, 0.50, 1.0) is None
