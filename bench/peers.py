"""Accuracy and wall time of affinage against the reference peers, same machine, same run.

Usage: python bench/peers.py [--data oxford17,hymenoptera] [--recipes fast,linear-probe,full] [--peers trainer,probe]
Runs each command as a subprocess (wall time includes start-up, as a user sees it), with a cold
AFFINAGE_CACHE_DIR per affinage run unless --warm, and prints one JSON line per run plus ratio lines.

Recipes (affinage train options):
  fast          linear probe on 128-px features: the quickest way past the seed recipe's accuracy
  linear-probe  the default probe at the checkpoint's size
  full          full fine-tuning with the strategy's defaults
  lora          LoRA adapters + head
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
DATA = {"oxford17": SHARED / "data" / "oxford17" / "splits.csv", "hymenoptera": SHARED / "data" / "hymenoptera"}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return wall, out.stdout


RECIPES = {
    "fast": ["--strategy", "linear-probe", "--image-size", "128"],
    "linear-probe": ["--strategy", "linear-probe"],
    "full": ["--strategy", "full"],
    "lora": ["--strategy", "lora"],
}


def run_affinage(data: Path, recipe: str, warm_cache: str | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-")) / "run"
    env = dict(os.environ, AFFINAGE_CACHE_DIR=warm_cache or tempfile.mkdtemp(prefix="bench-cache-"))
    wall, _ = timed([sys.executable, "-m", "affinage.cli", "train", "--data", str(data), "--model", "efficientnet_lite0",
                     *RECIPES[recipe], "--out", str(out), "--quiet"], env)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"tool": "affinage", "strategy": recipe, "test_accuracy": round(metrics["test"]["accuracy"], 4),
            "wall_s": round(wall, 1), "cold_cache": warm_cache is None,
            "energy_kwh": (metrics.get("footprint") or {}).get("energy_kwh")}


def run_peer(data: Path, mode: str) -> dict:
    wall, stdout = timed([sys.executable, str(SHARED / "bench" / "seed_recipe.py"), str(data), mode])
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"tool": "seed_recipe", "strategy": mode, "test_accuracy": result["test_accuracy"], "wall_s": round(wall, 1),
            "peer_reported_wall_s": result["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="oxford17,hymenoptera")
    ap.add_argument("--recipes", default="fast,linear-probe,full", help=f"of {', '.join(RECIPES)}")
    ap.add_argument("--peers", default="trainer,probe")
    ap.add_argument("--warm", action="store_true", help="share one cache across affinage runs")
    args = ap.parse_args()
    warm = tempfile.mkdtemp(prefix="bench-cache-") if args.warm else None
    for name in args.data.split(","):
        rows = [run_peer(DATA[name], m) for m in args.peers.split(",") if m]
        rows += [run_affinage(DATA[name], s, warm) for s in args.recipes.split(",") if s]
        for r in rows:
            print(json.dumps({"data": name, **r}), flush=True)
        for peer in (r for r in rows if r["tool"] == "seed_recipe"):
            for ours in (r for r in rows if r["tool"] == "affinage"):
                print(f"{name}: affinage {ours['strategy']} vs {peer['strategy']}: accuracy {ours['test_accuracy']:.4f} vs "
                      f"{peer['test_accuracy']:.4f}, wall time ratio {ours['wall_s'] / peer['wall_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
