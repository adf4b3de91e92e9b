"""`affinage serve` under load: N `/predict` calls from T gradio_client threads against a server in its own process,
and where each call's time goes.

Usage: python bench/serve_load.py --run RUN_DIR [--photos DIR_OR_FILES ...] [--calls 200] [--threads 64]
                                  [--warmup 1] [--port 0] [--server-arg=--concurrency=16 ...] [--stock-client]
                                  [--json OUT.json]

Starts `affinage serve RUN --port P` as a subprocess (the client threads do not share the server's GIL), with
AFFINAGE_SERVE_STATS pointing at a temporary file, waits for it to answer, opens one gradio_client.Client per thread
and warms each up with --warmup calls, then times --calls calls (photos in turn, default the run's test split) and
prints
  latency        p50 / p95 / mean seconds per call, as a client sees it (upload + queue + SSE + handler)
  requests/s     calls / wall seconds of the timed stretch, against Run.probabilities' batch img/s on the same photos
                 (measured first, in this process)
  server         per request: in the handler, decode (data.load_pixels), waiting for the model, the model's forward
                 pass of the batch it was in; mean batch size; model busy share of the wall time; outside the model
                 (1 - model / latency) and outside the handler (upload, Gradio queue, SSE, client)
  cpu            CPU seconds of the server and of this (client) process over the timed stretch
The server's counters (serve.ServeStats) are read through SIGUSR1 before and after the timed calls, so the warm-up is
not counted. The clients run on the same CPUs as the server: on a small machine they take a share of it (see cpu).
Nothing here is asserted: speed lives in bench/, never in tests. Run it with nothing else heavy on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from affinage.serve import STATS_ENV  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_list(run: str, given: list[str]) -> list[str]:
    if not given:
        from affinage.predict import held_out_photos
        from affinage.saved import Run

        return held_out_photos(Run.load(run))
    photos: list[str] = []
    for item in given:
        p = Path(item)
        photos += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [item]
    return photos


def predict_throughput(run_dir: str, photos: list[str], n: int = 64) -> float:
    """img/s of Run.probabilities on decoded photos in batches, in this process before the server starts: the
    figure `affinage predict` reaches, which a server can at best approach."""
    import numpy as np

    from affinage.data import load_pixels
    from affinage.saved import Run

    run = Run.load(run_dir)
    pixels = np.stack([load_pixels(Path(photos[k % len(photos)]).read_bytes(), run.preprocessing) for k in range(n)])
    run.probabilities(pixels[:16])  # load and warm up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run.probabilities(pixels)
        best = min(best, time.perf_counter() - t0)
    return n / best


def start_server(run: str, port: int, stats_path: str, server_args: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, STATS_ENV: stats_path, "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "affinage.cli", "serve", run, "--port", str(port), *server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the server answers
    if "serving" not in line:
        proc.kill()
        sys.exit(f"serve_load: the server did not start: {line}{proc.communicate()[1][-2000:]}")
    return proc, f"http://127.0.0.1:{port}/"


def server_stats(proc: subprocess.Popen, path: str, timeout_s: float = 30.0) -> dict:
    """Ask the server for its counters (SIGUSR1) and read them back."""
    Path(path).unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit("serve_load: the server wrote no stats (is it affinage's serve.py with ServeStats?)")
        time.sleep(0.05)
    return json.loads(Path(path).read_text())


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory written by `affinage train`")
    parser.add_argument("--photos", nargs="*", default=[], help="photo files or folders (default: the test split)")
    parser.add_argument("--calls", type=int, default=200, help="timed /predict calls (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=64, help="client threads (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per client first (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args",
                        help="extra `affinage serve` argument, e.g. --server-arg=--concurrency=16 (repeatable)")
    parser.add_argument("--stock-client", action="store_true",
                        help="let gradio_client build a fresh SSL context (CA bundle load, ~40 ms CPU) for each of the "
                             "3 HTTP requests of a call, as it does by default; otherwise the threads share one")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    photos = photo_list(args.run, args.photos)
    if not photos:
        sys.exit("serve_load: no photos (pass --photos, or a run whose test split lists files on disk)")
    # gradio_client opens a new httpx.Client per request, and each loads the CA bundle into a new SSL context even
    # for http://: most of a call's client-side CPU. On one machine that CPU is taken from the server under test.
    # (ssl_verify goes to httpx's verify=, which takes a ready SSLContext as it is)
    ssl_verify = True if args.stock_client else ssl.create_default_context()
    predict_img_s = predict_throughput(args.run, photos)
    stats_path = str(Path(tempfile.mkdtemp(prefix="serve-load-")) / "stats.json")
    proc, url = start_server(args.run, args.port or free_port(), stats_path, args.server_args)
    try:
        local = threading.local()
        barrier = threading.Barrier(args.threads)

        def ready(_: int) -> None:  # one client per thread, opened and warmed up before the clock starts
            local.client = Client(url, verbose=False, ssl_verify=ssl_verify)
            for k in range(args.warmup):
                local.client.predict(handle_file(photos[k % len(photos)]), api_name="/predict")
            barrier.wait()

        def call(k: int) -> float | Exception:
            t0 = time.perf_counter()
            try:
                local.client.predict(handle_file(photos[k % len(photos)]), api_name="/predict")
            except Exception as exc:  # counted and shown below
                return exc
            return time.perf_counter() - t0

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(ready, range(args.threads)))
            before, cpu0 = server_stats(proc, stats_path), time.process_time()
            start = time.perf_counter()
            results = list(pool.map(call, range(args.calls)))
            wall = time.perf_counter() - start
            after, cpu1 = server_stats(proc, stats_path), time.process_time()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    latencies = [r for r in results if isinstance(r, float)]
    errors = [r for r in results if isinstance(r, Exception)]
    if not latencies:
        sys.exit(f"serve_load: every call failed, e.g. {errors[0]!r}")
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float)) and k != "torch_threads"}
    n, images, mean = max(d["requests"], 1), max(d["images"], 1), statistics.fmean(latencies)
    per_request = {"handler": d["handler_s"] / n, "decode": d["decode_s"] / n,
                   "model_wait": d["image_wait_s"] / images, "model": d["image_model_s"] / images}
    figures = {
        "calls": args.calls, "threads": args.threads, "errors": len(errors), "server_args": args.server_args,
        "client": "stock" if args.stock_client else "shared SSL context",
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "mean_s": mean,
        "requests_per_s": len(latencies) / wall, "wall_s": wall, "predict_batch_img_per_s": predict_img_s,
        "per_request_s": per_request,
        "share_of_latency": {"decode": per_request["decode"] / mean, "model_wait": per_request["model_wait"] / mean,
                             "model": per_request["model"] / mean,
                             "outside_model": 1 - per_request["model"] / mean,
                             "outside_handler": 1 - per_request["handler"] / mean},
        "mean_batch": d["images"] / max(d["batches"], 1), "batches": d["batches"],
        "model_busy_share": d["model_s"] / wall, "model_thread_cpu_share": d.get("model_thread_cpu_s", 0.0) / max(d["model_s"], 1e-9),
        "cpu_s": {"server": d["cpu_s"], "client": cpu1 - cpu0, "available": wall * (os.cpu_count() or 1)},
        "torch_threads": after["torch_threads"], "server_requests": d["requests"],
    }
    share = figures["share_of_latency"]
    print(f"{args.calls} /predict calls from {args.threads} threads ({len(errors)} errors), {figures['client']} "
          f"client, {' '.join(args.server_args) or 'default serve options'}")
    print(f"  latency      p50 {figures['p50_s']:.3f} s  p95 {figures['p95_s']:.3f} s  mean {mean:.3f} s")
    print(f"  throughput   {figures['requests_per_s']:.1f} requests/s ({wall:.1f} s wall); predict in batches "
          f"{predict_img_s:.1f} img/s here, {predict_img_s / figures['requests_per_s']:.1f}x")
    print(f"  per request  handler {per_request['handler'] * 1e3:.1f} ms = decode {per_request['decode'] * 1e3:.1f}"
          f" + model wait {per_request['model_wait'] * 1e3:.1f} + model {per_request['model'] * 1e3:.1f} (+ rest)")
    print(f"  share        model {share['model']:.1%}, outside the model {share['outside_model']:.1%} "
          f"(decode {share['decode']:.1%}, outside the handler {share['outside_handler']:.1%})")
    print(f"  batches      {d['batches']} of mean {figures['mean_batch']:.2f} images; model busy "
          f"{figures['model_busy_share']:.1%} of the wall time (its thread on a CPU "
          f"{figures['model_thread_cpu_share']:.0%} of that); torch threads {after['torch_threads']}")
    print(f"  cpu          server {d['cpu_s']:.1f} s, clients {cpu1 - cpu0:.1f} s of "
          f"{figures['cpu_s']['available']:.1f} core-s")
    if errors:
        print(f"  first error  {errors[0]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
