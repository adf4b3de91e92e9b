"""The image store at scale, through the real CLI: memory stays flat while the decoded images take ~6 GB on disk, and
a rerun with 100 new files decodes only those 100.

    .venv/bin/python bench/store_bench.py [--images 30000] [--add 100] [--corrupt 36] [--model tiny] [--epochs 5]
                                          [--quick]

1. Writes a synthetic class-folder dataset of --images 256-px JPEGs (4 classes; --corrupt of them truncated, empty
   or text) under --root (default /tmp/affinage-bench, outside the repository; reused when already there).
2. `affinage train --strategy linear-probe` on it with a fresh AFFINAGE_CACHE_DIR, sampling RssAnon (anonymous
   resident memory, /proc/<pid>/status, summed over the process and its children) every 0.2 s.
3. Adds --add new JPEGs and trains again (a new --out, the same cache).
Prints, for each run: images, the decoded store's size on disk, peak RssAnon, decode seconds (metrics.json
timing.decode_seconds) and how many images the run decoded (timing.decoded_images when the run records it; else the
rows the store gained).

The stored side is what matters for the store's size: it is input_size / crop_pct. `--model tiny` (default) builds
timm's test_resnet (random weights, a few seconds per 30k features) with input_size 64 and crop_pct 0.25, so the
store keeps 256-px images (30,000 x 3 x 256 x 256 = 5.9 GB) while features stay cheap; `--model efficientnet_lite0`
stores the same 256 px (224 / 0.875) but extracts real features (~20+ min for 30k images on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("amber", "jade", "cobalt", "slate")
COLOURS = ((230, 140, 20), (30, 190, 90), (40, 70, 220), (120, 120, 130))
SIDE = 256


def draw(index: int, seed: int) -> tuple[int, bytes]:
    """One distinct 256-px JPEG: a random smooth background (distinct perceptual hashes, so no leak pairs) and a
    class-coloured disc or bar at a random place."""
    import io

    from PIL import Image

    rng = np.random.default_rng([seed, index])
    cls = index % len(CLASSES)
    grid = (rng.random((5, 5, 3)) * 200 + 20).astype(np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    cy, cx, r = rng.uniform(60, 196), rng.uniform(60, 196), rng.uniform(30, 60)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if cls % 2 else (abs(xx - cx) <= r / 3) & (abs(yy - cy) <= r)
    img[mask] = 0.25 * img[mask] + 0.75 * np.array(COLOURS[cls])
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return cls, buf.getvalue()


def _write(job: tuple[Path, int, int, str]) -> None:
    root, index, seed, prefix = job
    cls, data = draw(index, seed)
    (root / CLASSES[cls] / f"{prefix}{index:06d}.jpg").write_bytes(data)


def write_images(root: Path, indices: range, seed: int, prefix: str, workers: int) -> None:
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(_write, [(root, i, seed, prefix) for i in indices], chunksize=256):
            pass


def corrupt(root: Path, count: int) -> list[Path]:
    """Spoil `count` of the images, spread over the classes: truncated, empty, or an HTML page named .jpg."""
    files = sorted(root.rglob("img_*.jpg"))
    picked = files[:: max(1, len(files) // count)][:count]
    for k, path in enumerate(picked):
        if k % 3 == 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif k % 3 == 1:
            path.write_bytes(b"")
        else:
            path.write_text("<html><body>404 Not Found</body></html>")
    return picked


def prepare_data(root: Path, n: int, n_corrupt: int, seed: int, workers: int) -> Path:
    """root/data with n images (n_corrupt spoiled), reused when a previous call made the same."""
    data, manifest = root / "data", root / "data.json"
    wanted = {"images": n, "corrupt": n_corrupt, "seed": seed, "side": SIDE}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted and data.is_dir():
        for added in data.rglob("added_*.jpg"):  # left by an earlier benchmark's second run
            added.unlink()
        return data
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    write_images(data, range(n), seed, "img_", workers)
    corrupt(data, n_corrupt)
    past = time.time() - 3600  # as photos copied in a while ago (the hash memo skips files modified seconds ago)
    for p in data.rglob("*.jpg"):
        os.utime(p, (past, past))
    manifest.write_text(json.dumps(wanted))
    print(f"wrote {n:,} JPEGs ({n_corrupt} spoiled) in {time.perf_counter() - t0:.0f} s -> {data}", flush=True)
    return data


def tiny_model(root: Path) -> Path:
    """timm's test_resnet in timm's Hub folder format, input 64 px with crop_pct 0.25: a 256-px stored side."""
    folder = root / "tiny-resnet-64"
    if (folder / "config.json").exists():
        return folder
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, 64, 64], crop_pct=0.25)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return out


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run `cmd`, sampling the RssAnon of its process tree every 0.2 s; peak of the sum and of the main process."""
    peak = {"tree_kib": 0, "main_kib": 0}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pids = _tree(proc.pid)
                sizes = [_rss_anon_kib(p) for p in pids]
                peak["tree_kib"] = max(peak["tree_kib"], sum(sizes))
                peak["main_kib"] = max(peak["main_kib"], sizes[0] if sizes else 0)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return {"peak_rss_anon_gb": peak["tree_kib"] / 2**20, "peak_rss_anon_main_gb": peak["main_kib"] / 2**20,
            "wall_seconds": time.perf_counter() - t0}


def store_rows(cache: Path) -> int:
    total = 0
    for index in (cache / "images").glob("*/index.sqlite"):
        with sqlite3.connect(index) as db:
            total += db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    return total


def store_bytes(cache: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (cache / "images").glob("*/shard-*.npy"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/affinage-bench"), help="work folder (outside the repo)")
    p.add_argument("--images", type=int, default=30_000)
    p.add_argument("--add", type=int, default=100, help="new images for the second run")
    p.add_argument("--corrupt", type=int, default=36)
    p.add_argument("--model", default="tiny", help="tiny (default) or any affinage --model, e.g. efficientnet_lite0")
    p.add_argument("--quick", action="store_true", help="3,000 images (a smoke test; the store is then ~0.6 GB)")
    p.add_argument("--epochs", type=int, default=5,
                   help="head epochs (default 5: the probe's 100 would take ~15 min on 30k features, and training "
                        "the head is not what this measures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing JPEGs")
    args = p.parse_args()
    n = 3_000 if args.quick else args.images

    args.root.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.root, n, args.corrupt, args.seed, args.workers)
    model = str(tiny_model(args.root)) if args.model == "tiny" else args.model
    cache, runs = args.root / "cache", args.root / "runs"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    env = {**os.environ, "AFFINAGE_CACHE_DIR": str(cache)}
    cli = str(REPO / ".venv" / "bin" / "affinage")
    if not Path(cli).exists():
        cli = shutil.which("affinage") or sys.exit("the affinage command is not installed")

    results = []
    for name in ("first", "second"):
        if name == "second":
            write_images(data, range(n, n + args.add), args.seed, "added_", args.workers)
        images = sum(1 for _ in data.rglob("*.jpg"))
        rows_before = store_rows(cache) if cache.exists() else 0
        cmd = [cli, "train", "--data", str(data), "--model", model, "--strategy", "linear-probe",
               "--epochs", str(args.epochs), "--out", str(runs / name), "--quiet"]
        print(f"$ AFFINAGE_CACHE_DIR={cache} {' '.join(cmd)}", flush=True)
        measured = run_measured(cmd, env, runs / f"{name}.log")
        timing = json.loads((runs / name / "metrics.json").read_text())["timing"]
        decoded = timing.get("decoded_images", store_rows(cache) - rows_before)
        results.append({"run": name, "images": images, "store_gb": store_bytes(cache) / 1e9,
                        "decode_seconds": timing["decode_seconds"], "decoded_images": decoded,
                        "decoded_from": "metrics" if "decoded_images" in timing else "store rows added",
                        "skipped": json.loads((runs / name / "metrics.json").read_text())["data"]["skipped"],
                        **measured})
        r = results[-1]
        print(f"{name}: {images:,} files ({r['skipped']} skipped), store {r['store_gb']:.2f} GB on disk, "
              f"peak RssAnon {r['peak_rss_anon_gb']:.2f} GB (main process {r['peak_rss_anon_main_gb']:.2f} GB), "
              f"decoded {decoded:,} image(s) in {r['decode_seconds']:.1f} s, run {r['wall_seconds']:.0f} s", flush=True)
    first, second = results
    print(f"second decode: {second['decode_seconds']:.1f} s for {second['decoded_images']} new images vs "
          f"{first['decode_seconds']:.1f} s for {first['decoded_images']:,} "
          f"(ratio {second['decode_seconds'] / first['decode_seconds']:.3f})")
    (args.root / "results.json").write_text(json.dumps({"model": model, "runs": results}, indent=2))
    print(f"results -> {args.root / 'results.json'}")


if __name__ == "__main__":
    main()
