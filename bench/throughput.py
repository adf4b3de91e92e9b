"""Throughput of this machine against affinage's own paths, in one run: how far each affinage figure is from the
raw limit of the same hardware.

Usage: python bench/throughput.py [--data ../shared/data/oxford17/splits.csv] [--images 256] [--run RUN_DIR]
                                  [--model efficientnet_lite0] [--json OUT.json]

Prints img/s for
  decode         affinage's decode path (data.load_pixels: JPEG draft mode, resize, centre crop) on the data's files
  raw forward    the backbone's forward_features alone, on a ready tensor, in each runtime this machine offers:
                 torch fp32 (contiguous), torch fp32 channels-last, torch bf16 autocast + channels-last (CPUs with
                 AVX512-BF16/AMX, GPUs), onnxruntime fp32 (when installed); batch 16 and 64
  features       affinage's feature extraction (inference.cached_features on an empty cache: transform, batches,
                 copy out, cache write) in each runtime a run can pick (runtime.py), as a ratio of the fastest raw
                 forward; the one-off export + check + timing a run pays once per backbone and machine apart
  train step     one optimiser step per strategy family (head on cached features, partial:2, full), batch 32, fp32
                 and (CPUs with AVX512-BF16/AMX, GPUs) bf16 autocast
  predict        with --run: single-image latency p50/p95 and batch throughput of Run.logits on decoded pixels
Nothing here is asserted: speed lives in bench/, never in tests. Run it with nothing else heavy on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from affinage.backbones import create_model  # noqa: E402
from affinage.data import eval_transform, load_pixels, load_source  # noqa: E402
from affinage.inference import cpu_has_fast_bf16, default_device  # noqa: E402
from affinage.strategies import freeze_all_but  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "oxford17" / "splits.csv"


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls (seconds): noise on a shared machine only ever adds time."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decoded(data: str, n: int, pp) -> tuple[np.ndarray, float]:
    images = load_source(data)
    samples = images.samples[:n]
    blobs = [images.read_bytes(s) for s in samples]
    t0 = time.perf_counter()
    pixels = np.stack([load_pixels(b, pp) for b in blobs])
    return pixels, len(blobs) / (time.perf_counter() - t0)


def ready_batch(pixels: np.ndarray, pp, batch: int) -> torch.Tensor:
    tf = eval_transform(pp)
    return torch.stack([tf(torch.from_numpy(np.array(pixels[i % len(pixels)]))) for i in range(batch)])


def raw_forward(net, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """img/s of forward_features alone in each runtime."""
    out: dict[str, float] = {}
    net = net.to(device).eval()
    with torch.inference_mode():
        xc = x.to(device)
        net.forward_features(xc)  # warm-up
        out["torch fp32"] = len(x) / best_of(lambda: net.forward_features(xc))
        net_cl = net.to(memory_format=torch.channels_last)
        xl = xc.contiguous(memory_format=torch.channels_last)
        net_cl.forward_features(xl)
        out["torch fp32 channels-last"] = len(x) / best_of(lambda: net_cl.forward_features(xl))
        if device.type == "cuda" or cpu_has_fast_bf16():
            dtype = torch.bfloat16
            with torch.autocast(device.type, dtype=dtype):
                net_cl.forward_features(xl)
                out["torch bf16 autocast channels-last"] = len(x) / best_of(lambda: net_cl.forward_features(xl))
    try:
        import onnxruntime as ort
    except ImportError:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.onnx")

        class Features(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, t):
                return self.m.forward_features(t)

        torch.onnx.export(Features(net.float().to("cpu").to(memory_format=torch.contiguous_format)), x[:1], path,
                          input_names=["pixels"], output_names=["features"], dynamic_axes={"pixels": {0: "n"}},
                          dynamo=False)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        session.run(None, {"pixels": xn})
        out["onnxruntime fp32"] = len(x) / best_of(lambda: session.run(None, {"pixels": xn}))
    return out


def features_path(net, pixels: np.ndarray, pp, device: torch.device) -> dict[str, float]:
    """img/s of affinage's cached_features on an empty cache, in each runtime a run can pick (runtime.py): torch in
    the run's precision, and onnxruntime (export and check timed apart, as a run pays them once per backbone)."""
    from affinage.inference import cached_features, resolve_precision
    from affinage.runtime import choose_runtime, torch_runtime

    dtype = resolve_precision("auto", device).inference_dtype
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AFFINAGE_CACHE_DIR"] = tmp
        net = net.to(device).to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        onnx = choose_runtime("onnx", net, "bench", pixels, pp, device, dtype, len(pixels))
        out["export + check + timing (once per backbone) s"] = time.perf_counter() - t0
        runtimes = {"torch " + ("bf16" if dtype is not None else "fp32"): torch_runtime(dtype, "bench")}
        if onnx.name == "onnx":
            runtimes["onnx fp32"] = onnx
        for name, runtime in runtimes.items():
            def extract(runtime=runtime, name=name) -> None:  # fresh keys: every repeat computes (and writes) all features
                hashes = [f"bench-{name}-{i}-{time.time_ns()}" for i in range(len(pixels))]
                cached_features(net, "bench", pixels, hashes, pp, device, dtype, progress=False, runtime=runtime)

            out[name] = len(pixels) / best_of(extract, 2)  # best of 2, as the raw figures are best of 3
    return out


def train_steps(model: str, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """img/s of one optimiser step (fp32, and bf16 autocast where fast) for a head on features and for partial:2 / full fine-tuning."""
    out: dict[str, float] = {}
    y = torch.randint(0, 17, (len(x),))
    net = create_model(model, 17).to(device).to(memory_format=torch.channels_last).train()
    xl = x.to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = net.forward_features(xl).detach()
    head = net.head
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)

    def head_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()

    out["head on cached features"] = len(x) / best_of(head_step)
    for name, depth in (("partial:2", 2), ("full", len(net.blocks()))):
        freeze_all_but(net, depth)  # what the strategies train: the top `depth` blocks and the head
        step_opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

        for bf16 in (False, True) if (device.type == "cuda" or cpu_has_fast_bf16()) else (False,):
            def step(step_opt: torch.optim.Optimizer = step_opt, bf16: bool = bf16) -> None:
                step_opt.zero_grad()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(net(xl), y)
                loss.backward()
                step_opt.step()

            step()
            out[f"{name} step{' bf16 autocast' if bf16 else ''}"] = len(x) / best_of(step, 2)
    return out


def predict_figures(run_dir: str, pixels: np.ndarray) -> dict[str, float]:
    from affinage.saved import Run

    run = Run.load(run_dir)
    run.logits(pixels[:1])  # load and warm up
    latencies = []
    for i in range(min(50, len(pixels))):
        t0 = time.perf_counter()
        run.logits(pixels[i:i + 1])
        latencies.append(1000 * (time.perf_counter() - t0))
    batch = len(pixels) / best_of(lambda: run.logits(pixels), 2)
    q = statistics.quantiles(latencies, n=20)
    return {"single-image p50 ms": statistics.median(latencies), "single-image p95 ms": q[18],
            "batch img/s": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--run", help="a finished run directory: also measure predict")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = default_device()
    net = create_model(args.model, 17)
    pp = net.preprocessing
    pixels, decode = decoded(args.data, args.images, pp)
    figures: dict[str, object] = {"device": str(device), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "decode img/s": decode}
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.model}, "
          f"{pp.input_size} px, {len(pixels)} images")
    print(f"decode (affinage load_pixels)           {decode:8.1f} img/s")
    for batch in (16, 64):
        raw = raw_forward(net, ready_batch(pixels, pp, batch), device)
        figures[f"raw forward batch {batch}"] = raw
        for name, v in raw.items():
            print(f"raw forward {name:<33} b{batch:<3} {v:8.1f} img/s")
    fastest = max(v for k, v in figures.items() if k.startswith("raw forward") for v in v.values())
    feats = features_path(net, pixels, pp, device)
    figures["features"] = feats
    print(f"affinage runtime choice: export + check + timing {feats.pop('export + check + timing (once per backbone) s'):.1f} s"
          " (once per backbone and machine)")
    for name, v in feats.items():
        print(f"affinage feature extraction {name:<12} {v:8.1f} img/s = {v / fastest:.2f} of the fastest raw")
    figures["features / fastest raw"] = max(feats.values()) / fastest
    steps = train_steps(args.model, ready_batch(pixels, pp, 32), device)
    figures["train step img/s"] = steps
    for name, v in steps.items():
        print(f"train {name:<34}{v:8.1f} img/s")
    if args.run:
        pred = predict_figures(args.run, pixels)
        figures["predict"] = pred
        print(f"predict single image p50 {pred['single-image p50 ms']:.1f} ms, p95 {pred['single-image p95 ms']:.1f} "
              f"ms; batch {pred['batch img/s']:.1f} img/s = {pred['batch img/s'] / fastest:.2f} of the fastest raw")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
