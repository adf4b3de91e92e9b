"""The issues' must-show checks through the real CLI on ../shared/data, one JSON line each (run on a quiet machine).

Usage: python bench/mustshow.py [--checks demo,hymenoptera,rerun,reproduce,compare,torchrun] [--work DIR]

  demo         `affinage demo`: accuracy >= 0.95 in <= 3 min
  hymenoptera  linear-probe >= 0.93, the stray .gif listed in skipped_files.csv
  rerun        the same linear-probe twice on a fresh cache: second wall time <= 40% of the first
  reproduce    `affinage reproduce` of a hymenoptera partial:1 run prints `identical`
  compare      `affinage compare` on oxford17 (default strategies): best test accuracy >= 0.976
  torchrun     oxford17 partial:2 in 2 processes (torchrun, gloo) vs 1: one complete run dir, |diff| <= 0.01
(oxford17 `full` against the HF-Trainer seed recipe: bench/peers.py --data oxford17 --recipes full --peers trainer.)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
AFFINAGE = str(BIN / "affinage")


def run(cmd: list[str], cache: Path, check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "AFFINAGE_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if check and out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    return wall, out


def accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]


def check_demo(work: Path) -> dict:
    wall, _ = run([AFFINAGE, "demo", "--out", str(work / "demo")], work / "cache-demo")
    acc = accuracy(work / "demo")
    return {"check": "demo", "accuracy": acc, "wall_s": round(wall, 1), "ok": acc >= 0.95 and wall <= 180}


def check_hymenoptera(work: Path) -> dict:
    out = work / "hym"
    wall, _ = run([AFFINAGE, "train", "--data", str(DATA / "hymenoptera"), "--strategy", "linear-probe", "--out",
                   str(out), "--quiet"], work / "cache-hym")
    skipped = [row["path"] for row in csv.DictReader(open(out / "skipped_files.csv", encoding="utf-8"))]
    gif = any(p.endswith(".gif") for p in skipped)
    acc = accuracy(out)
    return {"check": "hymenoptera", "accuracy": acc, "wall_s": round(wall, 1), "skipped": skipped,
            "ok": acc >= 0.93 and gif}


def check_rerun(work: Path) -> dict:
    cache = work / "cache-rerun"
    cmd = [AFFINAGE, "train", "--data", str(DATA / "hymenoptera"), "--strategy", "linear-probe", "--quiet"]
    first, _ = run(cmd + ["--out", str(work / "rerun1")], cache)
    second, _ = run(cmd + ["--out", str(work / "rerun2")], cache)
    same = json.loads((work / "rerun1" / "metrics.json").read_text())["test"] == \
        json.loads((work / "rerun2" / "metrics.json").read_text())["test"]
    return {"check": "rerun", "first_s": round(first, 2), "second_s": round(second, 2),
            "ratio": round(second / first, 3), "same_test_block": same, "ok": second / first <= 0.40 and same}


def check_reproduce(work: Path) -> dict:
    cache, out = work / "cache-repro", work / "repro"
    run([AFFINAGE, "train", "--data", str(DATA / "hymenoptera"), "--strategy", "partial:1", "--out", str(out),
         "--quiet"], cache)
    wall, res = run([AFFINAGE, "reproduce", str(out)], cache, check=False)
    return {"check": "reproduce", "accuracy": accuracy(out), "rc": res.returncode,
            "says_identical": "identical" in res.stdout, "wall_s": round(wall, 1),
            "ok": res.returncode == 0 and "identical" in res.stdout}


def check_compare(work: Path) -> dict:
    out = work / "compare"
    wall, res = run([AFFINAGE, "compare", "--data", str(DATA / "oxford17" / "splits.csv"), "--out", str(out), "--quiet"],
                    work / "cache-compare")
    rows = list(csv.DictReader(open(out / "compare.csv", encoding="utf-8")))
    best = max(rows, key=lambda r: float(r["test_accuracy"]))
    return {"check": "compare", "wall_s": round(wall, 1), "best": best["strategy"],
            "best_accuracy": float(best["test_accuracy"]),
            "rows": {r["strategy"]: float(r["test_accuracy"]) for r in rows}, "ok": float(best["test_accuracy"]) >= 0.976}


def check_torchrun(work: Path) -> dict:
    data = str(DATA / "oxford17" / "splits.csv")
    cache = work / "cache-torchrun"
    single, _ = run([AFFINAGE, "train", "--data", data, "--strategy", "partial:2", "--out", str(work / "tr1"), "--quiet"],
                    cache)
    double, _ = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "affinage.cli", "train", "--data", data,
                     "--strategy", "partial:2", "--out", str(work / "tr2"), "--quiet"], cache)
    a, b = accuracy(work / "tr1"), accuracy(work / "tr2")
    world = json.loads((work / "tr2" / "metrics.json").read_text())["distributed"]["world_size"]
    complete = all((work / "tr2" / f).exists() for f in ("model/model.json", "model/model.safetensors", "metrics.json",
                                                         "test_predictions.csv", "report.html", "splits/test.csv"))
    return {"check": "torchrun", "one_process": a, "two_processes": b, "world_size": world, "complete": complete,
            "wall_1_s": round(single, 1), "wall_2_s": round(double, 1), "ok": abs(a - b) <= 0.01 and complete and world == 2}


CHECKS = {"demo": check_demo, "hymenoptera": check_hymenoptera, "rerun": check_rerun, "reproduce": check_reproduce,
          "compare": check_compare, "torchrun": check_torchrun}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--work", default=None, help="where runs go (default: a new temporary folder)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="affinage-mustshow-"))
    work.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.checks.split(","):
        result = CHECKS[name](work)
        print(json.dumps(result), flush=True)
        if not result["ok"]:
            failed.append(name)
    print(f"{len(CHECKS) - len(failed) if args.checks == ','.join(CHECKS) else len(args.checks.split(',')) - len(failed)}"
          f" passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
