"""Issue #12's must-show: add classes to a trained model without forgetting the old ones, forgetting measured.

Usage: python bench/keep_bench.py [--out DIR] [--skip-imagenet] [--skip-oxford]

1. Old = an oxford17 run (`--strategy partial:2`, 17 classes); new = hymenoptera (ants, bees), `--strategy partial:2`:
   a plain hymenoptera run, then `--init-from OLD --old-data oxford17 --keep none|replay|distill`. With `none` and
   `distill` the old data only measures (its train split is not trained on); with `replay` half of each batch is old.
   Checks: `none` forgets; `replay` forgets <= 0.02 with new-task accuracy within 0.02 of the plain run;
   `distill` (no old image trained on) forgets less than `none`.
2. Old = efficientnet_lite0's own ImageNet classifier (`--init-from pretrained`), old data = hymenoptera relabelled
   `ant` / `bee` (a CSV written here), new = oxford17, `--strategy partial:2`: the extended model's ant/bee accuracy
   within 0.03 of the original's, and >= 0.95 on oxford17's test images. Then `affinage predict` on a few photos
   of both tasks and `affinage export --format onnx` (its top-1 agreement with the run's model).
Writes OUT/keep_bench.md and OUT/keep_bench.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OXFORD = str(DATA / "oxford17" / "splits.csv")
HYMENOPTERA = str(DATA / "hymenoptera")


def affinage(*args: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "affinage.cli", *args]
    print("$ affinage " + shlex.join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, errors="replace")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"failed: {shlex.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def train(out: Path, *args: str) -> dict[str, Any]:
    if (out / "metrics.json").exists():  # resumable bench: a finished run is read, not redone
        m = metrics(out)
        return {"run": str(out), "wall_s": m["timing"]["wall_seconds"], "metrics": m}
    wall, _ = affinage("train", "--out", str(out), "--quiet", *args)
    return {"run": str(out), "wall_s": wall, "metrics": metrics(out)}


def summary(r: dict[str, Any]) -> dict[str, Any]:
    m = r["metrics"]
    old, new = m.get("old_task") or {}, m.get("new_task") or {}
    return {"strategy": m["strategy"], "classes": len(m["data"]["classes"]), "test_accuracy": m["test"]["accuracy"],
            "new_accuracy": new.get("accuracy", m["test"]["accuracy"] if not old else None),
            "old_before": old.get("accuracy_before"), "old_after": old.get("accuracy_after"),
            "forgetting": old.get("forgetting"), "old_images_trained_on": old.get("old_images_trained_on"),
            "wise_alpha": (m.get("last_points") or {}).get("wise_alpha"), "wall_s": round(r["wall_s"], 1)}


def oxford_then_hymenoptera(out: Path) -> dict[str, Any]:
    old = train(out / "oxford17-partial2", "--data", OXFORD, "--strategy", "partial:2")
    plain = train(out / "hymenoptera-partial2", "--data", HYMENOPTERA, "--strategy", "partial:2")
    rows = {"old run (oxford17, partial:2)": summary(old), "plain hymenoptera (partial:2)": summary(plain)}
    for keep in ("none", "replay", "distill"):
        r = train(out / f"hymenoptera-keep-{keep}", "--data", HYMENOPTERA, "--strategy", "partial:2",
                  "--init-from", old["run"], "--old-data", OXFORD, "--keep", keep)
        rows[f"--keep {keep}"] = summary(r)
    none, replay, distill = rows["--keep none"], rows["--keep replay"], rows["--keep distill"]
    plain_acc = rows["plain hymenoptera (partial:2)"]["test_accuracy"]
    checks = {
        "none forgets": {"forgetting": none["forgetting"], "ok": none["forgetting"] > 0},
        "replay forgets <= 0.02": {"forgetting": replay["forgetting"], "ok": replay["forgetting"] <= 0.02},
        "replay new-task within 0.02 of plain": {"new": replay["new_accuracy"], "plain": plain_acc,
                                                 "ok": abs(replay["new_accuracy"] - plain_acc) <= 0.02},
        "distill forgets less than none": {"distill": distill["forgetting"], "none": none["forgetting"],
                                           "ok": distill["forgetting"] < none["forgetting"]},
    }
    return {"rows": rows, "checks": checks}


def imagenet_then_oxford(out: Path) -> dict[str, Any]:
    old_csv = out / "hymenoptera-imagenet-names.csv"
    rows = []
    for split in ("train", "val"):
        for cls, name in (("ants", "ant"), ("bees", "bee")):
            folder = DATA / "hymenoptera" / split / cls
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                    rows.append((str(p.resolve()), name, "train" if split == "train" else "test"))
    out.mkdir(parents=True, exist_ok=True)
    with open(old_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    r = train(out / "oxford17-on-imagenet", "--data", OXFORD, "--strategy", "partial:2", "--init-from", "pretrained",
              "--old-data", str(old_csv))
    s = summary(r)
    run = Path(r["run"])
    photos = [str(p) for p in sorted((DATA / "hymenoptera" / "val" / "ants").glob("*.jpg"))[:2]]
    photos += [str(p) for p in sorted((DATA / "hymenoptera" / "val" / "bees").glob("*.jpg"))[:2]]
    test_rows = [row for row in csv.DictReader(open(run / "splits" / "test.csv", encoding="utf-8"))
                 if "oxford17" in row["path"]][:4]
    photos += [row["path"] if os.path.isabs(row["path"]) else str((ROOT / row["path"]).resolve()) for row in test_rows]
    _, text = affinage("predict", str(run), *photos, "--json", "--quiet")
    predicted = [{"file": Path(p["file"]).name, "label": p.get("label"), "probability": p.get("probability")}
                 for p in json.loads(text)]
    onnx_dir = out / "oxford17-on-imagenet-onnx"
    export_line = ""
    if not onnx_dir.exists():
        _, export_line = affinage("export", str(run), "--format", "onnx", "--out", str(onnx_dir))
    checks = {
        "ant/bee accuracy within 0.03 of the original": {"before": s["old_before"], "after": s["old_after"],
                                                         "ok": s["forgetting"] <= 0.03},
        "oxford17 test accuracy >= 0.95": {"new": s["new_accuracy"], "ok": s["new_accuracy"] >= 0.95},
    }
    return {"row": s, "checks": checks, "predict": predicted, "export": export_line.strip()}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# bench/keep_bench.py (issue #12), 2-core CPU", ""]
    a = result.get("oxford_then_hymenoptera")
    cols = ["strategy", "classes", "test_accuracy", "new_accuracy", "old_before", "old_after", "forgetting",
            "old_images_trained_on", "wise_alpha", "wall_s"]

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) and abs(v) < 10 else str(v)

    if a:
        lines += ["## Old = oxford17 (partial:2), new = hymenoptera (partial:2), old data = oxford17", "",
                  "| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for name, r in a["rows"].items()]
        lines += [""] + [f"- {k}: {json.dumps(v)}" for k, v in a["checks"].items()] + [""]
    b = result.get("imagenet_then_oxford")
    if b:
        lines += ["## Old = efficientnet_lite0's ImageNet classifier, old data = hymenoptera as ant/bee, new = oxford17 "
                  "(partial:2)",
                  "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                  "| " + " | ".join(fmt(b["row"].get(c)) for c in cols) + " |", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in b["checks"].items()]
        lines += ["", "predict: " + "; ".join(f"{p['file']} -> {p['label']} ({fmt(p['probability'])})"
                                              for p in b["predict"]), "", f"export: {b['export']}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/keep")
    ap.add_argument("--skip-imagenet", action="store_true")
    ap.add_argument("--skip-oxford", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    if not args.skip_oxford:
        result["oxford_then_hymenoptera"] = oxford_then_hymenoptera(out)
        (out / "keep_bench.md").write_text(markdown(result))
    if not args.skip_imagenet:
        result["imagenet_then_oxford"] = imagenet_then_oxford(out)
    (out / "keep_bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "keep_bench.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
