"""The leak check on Oxford 17 through the real CLI: planted copies found, and the duplicates already in the data.

    python bench/leak_check.py [--data ../shared/data/oxford17/splits.csv] [--work DIR]

1. A temporary copy of the split CSV where 10 test images (seeded choice) are resized to 80% and re-saved at JPEG
   quality 70 into train, then `affinage train --strategy linear-probe` on it: prints how many of the 10 planted
   pairs leaks.csv lists, with their hash distances.
2. The same command on the clean CSV: prints how many pairs it lists, by split pair and distance, and writes
   `pairs.png` (each pair side by side) so they can be inspected by eye.
Nothing is written next to the data: the copies live under --work (a temporary folder by default).
"""
from __future__ import annotations

import argparse
import csv
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


def run_train(csv_path: Path, out: Path, cache: Path) -> list[dict[str, str]]:
    import os

    env = {**os.environ, "AFFINAGE_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", "affinage.cli", "train", "--data", str(csv_path), "--model",
                    "efficientnet_lite0", "--strategy", "linear-probe", "--out", str(out), "--quiet"], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    with open(out / "leaks.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def plant(data: Path, work: Path, n: int, seed: int) -> tuple[Path, list[tuple[str, str]]]:
    from PIL import Image

    rows = list(csv.DictReader(open(data, newline="", encoding="utf-8")))
    base = data.parent
    test = [r for r in rows if r["split"] == "test"]
    picked = random.Random(seed).sample(test, n)
    copies = work / "copies"
    copies.mkdir(parents=True, exist_ok=True)
    out_rows = [{"path": str((base / r["path"]).resolve()), "label": r["label"], "split": r["split"]} for r in rows]
    pairs = []
    for r in picked:
        src = (base / r["path"]).resolve()
        with Image.open(src) as im:
            im = im.convert("RGB")
            small = im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.BICUBIC)
        dst = copies / f"{src.parent.name}_{src.stem}_copy.jpg"
        small.save(dst, quality=70)
        out_rows.append({"path": str(dst), "label": r["label"], "split": "train"})
        pairs.append((str(dst), str(src)))
    leaky = work / "leaky.csv"
    with open(leaky, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["path", "label", "split"])
        w.writeheader()
        w.writerows(out_rows)
    return leaky, pairs


def pair_grid(rows: list[dict[str, str]], base: Path, path: Path, side: int = 96) -> None:
    from PIL import Image

    cols = 4
    grid = Image.new("RGB", (cols * (2 * side + 8), ((len(rows) + cols - 1) // cols) * (side + 4)), "white")
    for k, r in enumerate(rows):
        x, y = (k % cols) * (2 * side + 8), (k // cols) * (side + 4)
        for j, key in enumerate(("path_a", "path_b")):
            p = Path(r[key]) if Path(r[key]).is_absolute() else base / r[key]
            with Image.open(p) as im:
                grid.paste(im.convert("RGB").resize((side, side)), (x + j * side, y))
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/oxford17/splits.csv")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--planted", type=int, default=10)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="affinage-leaks-"))
    cache = work / "cache"

    leaky, pairs = plant(args.data, work, args.planted, args.seed)
    rows = run_train(leaky, work / "runs" / "leaky", cache)
    found = 0
    for copy, original in pairs:
        hit = [r for r in rows if {Path(r["path_a"]).name, Path(r["path_b"]).name} == {Path(copy).name, Path(original).name}]
        found += bool(hit)
        print(f"  planted {Path(original).parent.name}/{Path(original).name}: "
              + (f"found, {hit[0]['distance']} bits apart" if hit else "MISSED"))
    print(f"planted copies found: {found}/{len(pairs)} ({len(rows)} pairs listed in all)")

    clean = run_train(args.data, work / "runs" / "clean", cache)
    where = Counter(f"{r['split_a']}-{r['split_b']}" for r in clean)
    distances = sorted(int(r["distance"]) for r in clean)
    print(f"clean data: {len(clean)} pairs listed ({dict(where)}); hash distances {distances}")
    if clean:
        pair_grid(clean, args.data.parent, work / "pairs.png")
        print(f"side by side: {work / 'pairs.png'}; runs in {work / 'runs'}")


if __name__ == "__main__":
    main()
