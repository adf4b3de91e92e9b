"""#15's must-show figures in one run on this machine (run it with nothing else heavy running):

  trainer     ../shared/bench/seed_recipe.py oxford17 trainer: wall seconds and test accuracy (the reference)
  probe       `affinage train --data oxford17/splits.csv --strategy linear-probe` on a cold cache (fresh
              AFFINAGE_CACHE_DIR: nothing decoded, exported or remembered), wall seconds as a ratio of the trainer's
  partial2    `--strategy partial:2` on oxford17 with `--runtime torch` (the features that initialise the head in
              bf16 torch, as before runtime.py) and with the default runtime: train img/s and test accuracy

Usage: python bench/speed.py [--skip trainer,probe,partial2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OXFORD17 = SHARED / "data" / "oxford17" / "splits.csv"
BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall, out.stdout


def affinage_train(strategy: str, work: Path, name: str, *extra: str) -> dict:
    cache, out = work / f"cache-{name}", work / name
    wall, _ = timed([str(BIN / "affinage"), "train", "--data", str(OXFORD17), "--strategy", strategy, "--out",
                     str(out), "--quiet", *extra], {"AFFINAGE_CACHE_DIR": str(cache)})
    m = json.loads((out / "metrics.json").read_text())
    t = m["timing"]
    return {"wall_s": round(wall, 1), "test_accuracy": m["test"]["accuracy"],
            "feature_runtime": m["model"].get("feature_runtime", {}).get("runtime"),
            "feature_s": round(t["feature_seconds"], 1), "decode_s": round(t["decode_seconds"], 1),
            "model_load_s": round(t["model_load_seconds"], 1), "train_s": round(t["train_seconds"], 1),
            "audit_s": (m.get("audit") or {}).get("seconds"),
            "train_img_s": t["train_samples_per_second"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="")
    ap.add_argument("--json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "trainer" not in skip:
            wall, out = timed([sys.executable, str(SHARED / "bench" / "seed_recipe.py"), str(OXFORD17), "trainer"])
            figures["trainer"] = {"wall_s": round(wall, 1), "result": json.loads(out.strip().splitlines()[-1])}
            print("trainer", json.dumps(figures["trainer"]), flush=True)
        if "probe" not in skip:
            figures["probe"] = affinage_train("linear-probe", work, "probe")
            if "trainer" in figures:
                figures["probe"]["ratio_to_trainer"] = round(figures["probe"]["wall_s"] /
                                                             figures["trainer"]["wall_s"], 3)  # type: ignore[index]
            print("probe", json.dumps(figures["probe"]), flush=True)
        if "partial2" not in skip:
            for name, extra in (("partial2-torch", ("--runtime", "torch")), ("partial2-auto", ())):
                figures[name] = affinage_train("partial:2", work, name, *extra)
                print(name, json.dumps(figures[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
