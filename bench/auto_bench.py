"""Issue #11's must-show: `affinage train` with defaults only (no strategy, no model) against the scikit-learn probe
peer on the same split, and against the best row of `affinage compare` on that split (run on a quiet machine).

Usage: python bench/auto_bench.py [--data oxford17,hymenoptera,flowers5,digits,fashion] [--out DIR]
                                  [--compare-strategies LIST] [--compare-model NAME] [--skip-compare]

Per data set, sequentially, each step its own process, timed:
  1. `affinage train --data D --out OUT/D/default --quiet` (defaults only), cold (fresh AFFINAGE_CACHE_DIR);
     read from metrics.json: test accuracy, strategy, backbone, candidates.
  2. the scikit-learn probe peer (../shared/bench/seed_recipe.py CSV probe) on the default run's own split: a
     path,label,split CSV written from OUT/D/default/splits/*.csv (digits: the 8x8 pixels written as PNG files).
  3. unless --skip-compare: `affinage compare` on that split (--train-args "--splits-from OUT/D/default"), with the
     default run's backbone unless --compare-model says otherwise; from compare.csv: the best test row and the row
     compare chose on val (auto_pick).
Checks: |default - best compare row| <= 0.005 (test accuracy); default >= probe + 0.02 where the probe is under
0.97 (else n/a). fashion (articleType, classes of 1-2 images) gets `--min-per-class 3` for train and compare: a
defaults-only run on it is refused without it, by design; that is the one option added, and the output says so.
Writes OUT/auto_bench.json and OUT/auto_bench.md (rewritten after every data set).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
SEED_RECIPE = SHARED / "bench" / "seed_recipe.py"
SETS: dict[str, str] = {
    "oxford17": str(DATA / "oxford17" / "splits.csv"),
    "hymenoptera": str(DATA / "hymenoptera"),
    "flowers5": str(DATA / "flowers5"),
    "digits": "digits",
    "fashion": str(DATA / "fashion_small" / "articleType.csv"),
}
EXTRA: dict[str, list[str]] = {"fashion": ["--min-per-class", "3"]}  # the only non-default option, said in the output
SPLITS = ("train", "val", "test")
SAME = 0.005  # |default - best compare row|
MARGIN = 0.02  # default over the probe peer
PROBE_CEILING = 0.97  # a probe at or above this leaves no room for the margin


def run(cmd: list[str], cache: Path | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(os.environ)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)  # cold
        env["AFFINAGE_CACHE_DIR"] = str(cache)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, errors="replace")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return wall, proc


def affinage(*args: str) -> list[str]:
    return [sys.executable, "-m", "affinage.cli", *args]


def write_peer_csv(run_dir: Path, dest: Path, png_dir: Path | None = None) -> Path:
    """path,label,split from a run's split lists (splits/{train,val,test}.csv: path,label,group,sha), with absolute
    paths. In-memory digits (keys `digits/<i>`) are written as 8x8 grayscale PNGs in `png_dir` first, the raw pixels
    affinage itself decodes (np.clip(images * 16, 0, 255) as uint8)."""
    pixels = None
    rows: list[tuple[str, str, str]] = []
    for split in SPLITS:
        with open(run_dir / "splits" / f"{split}.csv", newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                key = r["path"]
                if key.startswith("digits/"):
                    if pixels is None:
                        pixels = _digit_pixels()
                    assert png_dir is not None, "digits need a folder for their PNG files"
                    key = str(_write_png(pixels, int(key.split("/", 1)[1]), png_dir))
                elif not os.path.isabs(key):
                    key = str((ROOT / key).resolve())  # keys relative to the train process's working directory
                rows.append((key, r["label"], split))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return dest


def _digit_pixels() -> Any:
    import numpy as np
    from sklearn.datasets import load_digits

    return np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)


def _write_png(pixels: Any, i: int, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{i}.png"
    if not path.exists():
        Image.fromarray(pixels[i]).save(path)  # 2-D uint8: grayscale
    return path.resolve()


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output: {text[-500:]}")


def bench_set(name: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    data, extra = SETS[name], EXTRA.get(name, [])
    work = out / name
    default_dir = work / "default"
    result: dict[str, Any] = {"data": name, "spec": data, "extra_options": extra}
    saved = Path(args.reuse_from) / name / "default_probe.json" if args.reuse_from else None
    if saved is not None:  # steps 1 and 2 from an earlier --skip-compare run (same machine, quiet when measured)
        result.update(json.loads(saved.read_text()))
        default_dir = Path(args.reuse_from) / name / "default"
    else:
        _default_and_probe(name, data, extra, out, work, default_dir, result)
    _compare(name, data, extra, work, default_dir, result, args)
    result["checks"] = checks(result)
    return result


def _default_and_probe(name: str, data: str, extra: list[str], out: Path, work: Path, default_dir: Path,
                       result: dict[str, Any]) -> None:
    # 1. defaults only
    wall, _ = run(affinage("train", "--data", data, "--out", str(default_dir), "--quiet", *extra), out / f"cache-{name}")
    m = json.loads((default_dir / "metrics.json").read_text())
    result["default"] = {"test_accuracy": m["test"]["accuracy"], "strategy": m.get("strategy"),
                         "strategy_reason": m.get("strategy_reason"), "backbone": (m.get("model") or {}).get("backbone"),
                         "val": m.get("val"), "candidates": m.get("candidates"), "wall_s": round(wall, 1)}
    shutil.rmtree(out / f"cache-{name}", ignore_errors=True)

    # 2. the scikit-learn probe peer on the same split
    peer_csv = write_peer_csv(default_dir, work / "peer" / "split.csv", work / "png")
    wall, proc = run([sys.executable, str(SEED_RECIPE), str(peer_csv), "probe"])
    peer = last_json(proc.stdout)
    result["probe"] = {"test_accuracy": peer["test_accuracy"], "wall_s": round(wall, 1), "n_train": peer.get("n_train"),
                       "n_test": peer.get("n_test")}
    (work / "default_probe.json").write_text(json.dumps({k: result[k] for k in ("default", "probe")}, indent=2))


def _compare(name: str, data: str, extra: list[str], work: Path, default_dir: Path, result: dict[str, Any],
             args: argparse.Namespace) -> None:
    # 3. compare on the same split
    if not args.skip_compare:
        cmp_dir = work / "compare"
        model = args.compare_model or result["default"]["backbone"]
        cmd = affinage("compare", "--data", data, "--out", str(cmp_dir), "--quiet",
                       "--train-args", shlex.join(["--splits-from", str(default_dir), *extra]))
        if model:
            cmd += ["--model", model]
        if args.compare_strategies:
            cmd += ["--strategies", args.compare_strategies]
        wall, _ = run(cmd)
        with open(cmp_dir / "compare.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        best = max(rows, key=lambda r: float(r["test_accuracy"]))
        picked = next((r for r in rows if r.get("auto_pick") == "True"), None)
        result["compare"] = {
            "model": model, "wall_s": round(wall, 1),
            "best_test": {"strategy": best["strategy"], "test_accuracy": float(best["test_accuracy"])},
            "val_chosen": None if picked is None else {
                "strategy": picked["strategy"], "val_accuracy": _float(picked.get("val_accuracy")),
                "test_accuracy": float(picked["test_accuracy"])},
            "rows": [{k: r[k] for k in ("strategy", "val_accuracy", "val_loss", "test_accuracy", "wall_seconds",
                                        "auto_pick") if k in r} for r in rows],
        }


def checks(result: dict[str, Any]) -> dict[str, Any]:
    default, probe = result["default"]["test_accuracy"], result["probe"]["test_accuracy"]
    out: dict[str, Any] = {}
    if "compare" in result:
        best = result["compare"]["best_test"]["test_accuracy"]
        out["matches_best_compare"] = {"diff": round(default - best, 4), "ok": abs(default - best) <= SAME}
    if probe < PROBE_CEILING:
        out["beats_probe"] = {"margin": round(default - probe, 4), "ok": default >= probe + MARGIN}
    else:
        out["beats_probe"] = {"margin": round(default - probe, 4), "ok": None,
                              "note": f"n/a: probe >= {PROBE_CEILING}"}
    return out


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| data | default test acc | strategy | backbone | wall s | probe acc | probe wall s | compare best "
             "(test) | compare val-chosen | default vs best | default vs probe |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['data']} | error: {r['error'].splitlines()[0]} |" + " |" * 9)
            continue
        d, p, c, k = r["default"], r["probe"], r.get("compare"), r["checks"]
        best = f"{c['best_test']['strategy']} {c['best_test']['test_accuracy']:.4f}" if c else "skipped"
        chosen = c and c["val_chosen"]
        val = f"{chosen['strategy']} (test {chosen['test_accuracy']:.4f})" if chosen else ("—" if c else "skipped")
        same = k.get("matches_best_compare")
        same_s = f"{same['diff']:+.4f} {'ok' if same['ok'] else 'FAIL'}" if same else "—"
        bp = k["beats_probe"]
        probe_s = bp.get("note") or f"{bp['margin']:+.4f} {'ok' if bp['ok'] else 'FAIL'}"
        data = r["data"] + (f" ({' '.join(r['extra_options'])})" if r["extra_options"] else "")
        lines.append(f"| {data} | {d['test_accuracy']:.4f} | {d['strategy']} | {d['backbone']} | {d['wall_s']} | "
                     f"{p['test_accuracy']:.4f} | {p['wall_s']} | {best} | {val} | {same_s} | {probe_s} |")
    notes = [f"Checks: |default - best compare row| <= {SAME} (test accuracy); default >= probe + {MARGIN} where the "
             f"probe is under {PROBE_CEILING}. compare's val-chosen row is chosen on val; test is shown, never used "
             "to choose. The probe peer and compare use the default run's split."]
    if any(r.get("extra_options") for r in results):
        notes.append("fashion gets `--min-per-class 3` (classes of 1-2 images cannot be split; a defaults-only run "
                     "refuses the data without it, by design).")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=",".join(SETS), help="comma-separated, from: " + ", ".join(SETS))
    parser.add_argument("--out", default=None, help="new folder for the runs and results (default: a temporary one)")
    parser.add_argument("--compare-strategies", default=None, help="--strategies for compare (default: compare's)")
    parser.add_argument("--compare-model", default=None, help="--model for compare (default: the default run's backbone)")
    parser.add_argument("--skip-compare", action="store_true", help="default run and probe peer only")
    parser.add_argument("--reuse-from", default=None, help="an earlier --out whose default runs and probe results to "
                                                          "reuse (only compare runs here)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        parser.error(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="affinage-auto-bench-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            result = bench_set(name, out, args)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            result = {"data": name, "error": str(exc), "extra_options": EXTRA.get(name, [])}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "compare"} | (
            {"compare": {k: v for k, v in result["compare"].items() if k != "rows"}} if "compare" in result else {})),
            flush=True)
        (out / "auto_bench.json").write_text(json.dumps(results, indent=2))
        (out / "auto_bench.md").write_text(markdown(results))
    print(markdown(results))
    print(f"written: {out / 'auto_bench.json'}, {out / 'auto_bench.md'}")
    failed = [r for r in results if "error" in r or any(c.get("ok") is False for c in r["checks"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
