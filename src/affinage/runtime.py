"""Runtime for frozen work: which engine runs a frozen backbone's forward pass (torch, or onnxruntime on the
backbone exported once to ONNX), chosen by a short measurement on this machine, verified against fp32 torch before
use, and remembered.

`auto` (the default) on a CPU: a decision remembered for this backbone on this machine is used as it is; else, for
a job of at least `PROBE_MIN_IMAGES` images, the backbone is exported (cached beside the features), its features on
a check batch of the job's own images are compared with fp32 torch's (max |difference| <= `TOLERANCE` of the
features' range and the same top-1 through the checkpoint's own classifier, when it has one), and the faster of
torch (the run's precision, channels-last) and onnxruntime on that batch is kept. A check that fails, a model that
cannot be exported or onnxruntime missing: torch, with the reason printed. On GPUs: torch (its bf16/fp16 autocast).
"""
from __future__ import annotations

import contextlib
import io
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RUNTIMES
from .errors import AffinageError
from .storage import atomic_path, cache_dir, digest, read_json, write_json

PROBE_MIN_IMAGES = 400  # below this a one-off export (~2 s for efficientnet_lite0) costs more than it can save
ONNX_BATCH = 16  # onnxruntime's fastest batch on a 2-core CPU (bench/throughput.py: 181 img/s at 16, 156 at 64)
CHECK_IMAGES = 16  # the check batch: verified against fp32 torch, and timed in each runtime
TOLERANCE = 1e-3  # max |onnx - fp32 torch| over max |fp32 torch| on the check batch (fp32 ONNX: ~1e-5)
DECISION_VERSION = "runtime-v1"


@dataclass
class Runtime:
    """How frozen features are computed: `torch` (autocast `dtype`, channels-last) or `onnx` (fp32 onnxruntime)."""

    name: str  # "torch" | "onnx"
    dtype: torch.dtype | None  # torch's autocast dtype; None for onnx (fp32) and fp32 torch
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    session: Any = field(default=None, repr=False)  # onnxruntime.InferenceSession

    @property
    def precision(self) -> str:
        """The inference precision the features carry (what a saved run records)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")  # type: ignore[arg-type]

    @property
    def cache_tag(self) -> str:
        """Part of the feature cache key: features from different runtimes are cached apart."""
        return "onnx-fp32" if self.name == "onnx" else str(self.dtype)

    def features_of(self, pixels: Any, indices: list[int], flip: bool = False, progress: bool = False,
                    desc: str = "extracting features") -> torch.Tensor:
        """Pooled features of decoded uint8 rows (onnx): the centre crop is a slice, the scaling and normalisation
        run inside the graph, so the Python side copies bytes and nothing else; `flip`: of the mirrored images."""
        from tqdm.auto import tqdm

        name = self.session.get_inputs()[0].name
        size = self.session.get_inputs()[0].shape[-1]
        outs = []
        starts = range(0, len(indices), ONNX_BATCH)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress, mininterval=1.0):
            rows = np.asarray(pixels[indices[start:start + ONNX_BATCH]] if isinstance(pixels, np.ndarray)
                              else np.stack([np.asarray(pixels[i]) for i in indices[start:start + ONNX_BATCH]]))
            side = rows.shape[-1]
            top, left = int(round((rows.shape[-2] - size) / 2.0)), int(round((side - size) / 2.0))
            batch = rows[:, :, top:top + size, left:left + size]
            if flip:
                batch = batch[..., ::-1]
            outs.append(torch.from_numpy(self.session.run(None, {name: np.ascontiguousarray(batch)})[0]))
        return torch.cat(outs) if outs else torch.empty(0)

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.name, "precision": self.precision, "reason": self.reason, **self.evidence}


def torch_runtime(dtype: torch.dtype | None, reason: str) -> Runtime:
    return Runtime("torch", dtype, reason)


def choose_runtime(choice: str, net: nn.Module | None, model_key: str, pixels: Any, pp: Any, device: torch.device,
                   dtype: torch.dtype | None, n_images: int, log: Callable[[str], None] | None = None) -> Runtime:
    """The runtime for `n_images` frozen forward passes of `net` (None: not built; only a remembered decision can
    be used, or torch). `pixels`: decoded images, the first `CHECK_IMAGES` of which form the check batch."""
    if choice not in RUNTIMES:
        raise AffinageError(f"unknown runtime '{choice}'", f"choose one of {', '.join(RUNTIMES)}")
    if choice == "torch":
        return torch_runtime(dtype, "asked for (--runtime torch)")
    if device.type != "cpu":
        why = f"{device.type}: torch with {_dtype_name(dtype)} autocast (onnxruntime here runs on the CPU only)"
        if choice == "onnx" and log is not None:
            log(f"runtime: --runtime onnx ignored: {why}")
        return torch_runtime(dtype, why)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if choice == "onnx":
            raise AffinageError("--runtime onnx needs onnxruntime, which is not installed",
                                "pip install onnxruntime (or pass --runtime torch)") from None
        return torch_runtime(dtype, "onnxruntime is not installed (pip install onnxruntime)")
    remembered = read_decision(model_key, pp, dtype)
    if remembered is not None and (choice == "auto" or remembered.get("check_ok")):
        picked = remembered["runtime"] if choice == "auto" else "onnx"
        if picked == "torch" or not remembered.get("check_ok"):
            return Runtime("torch", dtype, remembered["reason"], _evidence(remembered))
        if onnx_path(model_key, pp).exists():
            return Runtime("onnx", None, remembered["reason"], _evidence(remembered), _session(onnx_path(model_key, pp)))
    if choice == "auto" and n_images < PROBE_MIN_IMAGES:
        return torch_runtime(dtype, f"{n_images} images: fewer than {PROBE_MIN_IMAGES}, a one-off ONNX export would "
                                    "cost more than it saves")
    if net is None:
        return torch_runtime(dtype, "no decision remembered for this backbone on this machine")
    decision = _measure(net, model_key, pixels, pp, dtype)
    if choice == "onnx" and not decision["check_ok"]:
        if log is not None:
            log(f"runtime: --runtime onnx not used: {decision['reason']}")
    remember_decision(model_key, pp, dtype, decision)
    use_onnx = decision["check_ok"] and (choice == "onnx" or decision["runtime"] == "onnx")
    if not use_onnx:
        return Runtime("torch", dtype, decision["reason"], _evidence(decision))
    reason = decision["reason"] if choice == "auto" else "asked for (--runtime onnx); " + decision["reason"]
    return Runtime("onnx", None, reason, _evidence(decision), _session(onnx_path(model_key, pp)))


def runtime_for_run(name: str, net: nn.Module, model_key: str, pp: Any, dtype: torch.dtype | None) -> Runtime:
    """The runtime a saved run was evaluated with, for predict/serve: its ONNX export (made again if this machine
    has none); torch fp32 (the same features within `TOLERANCE`) where onnxruntime is missing."""
    if name != "onnx":
        return torch_runtime(dtype, "the run's runtime")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return torch_runtime(None, "onnxruntime is not installed: fp32 torch, the same features within "
                                   f"{TOLERANCE:g}")
    path = onnx_path(model_key, pp)
    if not path.exists():
        export_features(net, path, pp)
    return Runtime("onnx", None, "the run's runtime", {}, _session(path))


# ----------------------------------------------------------------------------------------------
# Export, check and measurement
# ----------------------------------------------------------------------------------------------
def onnx_path(model_key: str, pp: Any) -> Path:
    """The backbone's ONNX export (features only), kept in the cache beside its features."""
    return cache_dir() / "onnx" / f"{digest('onnx-features-v2', json.dumps(pp.to_dict(), sort_keys=True), model_key, str(pp.input_size), torch.__version__)}.onnx"


class _Features(nn.Module):
    """uint8 centre-cropped images -> pooled features, with the checkpoint's scaling and normalisation in the graph."""

    def __init__(self, net: nn.Module, pp: Any):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(pp.mean), dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(list(pp.std), dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features((x.float() - self.mean) / self.std)  # type: ignore[operator]


def export_features(net: nn.Module, path: Path, pp: Any) -> None:
    """Export uint8 pixels -> `net.forward_features` (fp32, dynamic batch) to `path`, atomically; the net's mode,
    device and memory format are restored after."""
    was_training = net.training
    device = next(net.parameters()).device
    size = pp.input_size
    try:
        net.eval().float().cpu()
        with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Features(net, pp), (torch.zeros(1, 3, size, size, dtype=torch.uint8),), str(tmp),
                              input_names=["pixels"], output_names=["features"], dynamic_axes={"pixels": {0: "batch"}},
                              dynamo=False)
    finally:
        net.to(device).train(was_training)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads torch was given, no more
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_batch(pixels: Any, pp: Any) -> torch.Tensor:
    from .data import eval_transform

    tf = eval_transform(pp)
    n = min(CHECK_IMAGES, len(pixels))
    return torch.stack([tf(torch.from_numpy(np.array(pixels[i]))) for i in range(n)])


def _best_seconds(fn: Callable[[], Any], repeats: int = 2) -> float:
    fn()  # warm-up (first-call allocations, oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def _measure(net: nn.Module, model_key: str, pixels: Any, pp: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """Export, check against fp32 torch and time both runtimes on the check batch: the decision, with its figures."""
    from .inference import autocast, to_device

    x = _check_batch(pixels, pp)
    rows = list(range(len(x)))
    path = onnx_path(model_key, pp)
    t0 = time.perf_counter()
    try:
        if not path.exists():
            export_features(net, path, pp)
        session = _session(path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: this model stays on torch (said why)
        return {"runtime": "torch", "check_ok": False,
                "reason": f"the backbone cannot be exported to ONNX ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"}
    export_s = time.perf_counter() - t0
    was_training = net.training
    net.eval()
    cpu = torch.device("cpu")
    reference = net.forward_features(x).float()  # fp32 torch through the eval transform: what ONNX must match
    onnx = Runtime("onnx", None, "", session=session)
    got = onnx.features_of(pixels, rows)
    scale = float(reference.abs().max()) or 1.0
    error = float((got - reference).abs().max()) / scale
    top1 = _same_top1(net, reference, got)
    check_ok = error <= TOLERANCE and top1 is not False
    def in_torch() -> None:  # what a torch run pays per batch: the eval transform and the forward pass
        with autocast(cpu, dtype):
            net.forward_features(to_device(_check_batch(pixels, pp), cpu))

    torch_rate = len(x) / _best_seconds(in_torch)
    onnx_rate = len(x) / _best_seconds(lambda: onnx.features_of(pixels, rows))
    net.train(was_training)
    figures = {"check_images": len(x), "check_max_rel_error": error, "check_same_top1": top1,
               "img_s": {f"torch {_dtype_name(dtype)}": round(torch_rate, 1), "onnx fp32": round(onnx_rate, 1)},
               "export_s": round(export_s, 2)}
    if not check_ok:
        why = (f"max relative difference {error:.2g} > {TOLERANCE:g}" if error > TOLERANCE
               else "a different top-1 class on the check batch")
        return {"runtime": "torch", "check_ok": False,
                "reason": f"the ONNX export failed its check against fp32 torch ({why})", **figures}
    faster = "onnx" if onnx_rate > torch_rate else "torch"
    if faster == "onnx":
        reason = (f"onnxruntime fp32 measured faster on this machine ({onnx_rate:.0f} vs torch {_dtype_name(dtype)}'s "
                  f"{torch_rate:.0f} img/s); its features within {error:.1g} of fp32 torch's")
    else:
        reason = (f"torch {_dtype_name(dtype)} measured faster on this machine ({torch_rate:.0f} vs onnxruntime's "
                  f"{onnx_rate:.0f} img/s)")
    return {"runtime": faster, "check_ok": True, "reason": reason, **figures}


def _same_top1(net: nn.Module, reference: torch.Tensor, got: torch.Tensor) -> bool | None:
    """Whether the checkpoint's own classifier (e.g. ImageNet's) picks the same class from both features; None
    where the checkpoint had no classifier."""
    pretrained = getattr(net, "pretrained_head", None)
    if pretrained is None:
        return None
    head = pretrained.layer.float().cpu()
    try:
        return bool(torch.equal(head(reference).argmax(1), head(got).argmax(1)))
    except Exception:  # noqa: BLE001 - a head that does not take pooled features: no top-1 check, error check only
        return None


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def _evidence(decision: dict[str, Any]) -> dict[str, Any]:
    return {k: decision[k] for k in ("img_s", "check_max_rel_error", "check_same_top1", "check_images")
            if k in decision}


# ----------------------------------------------------------------------------------------------
# The remembered decision: per backbone, preprocessing, precision, machine and library versions
# ----------------------------------------------------------------------------------------------
def _decision_path(model_key: str, pp: Any, dtype: torch.dtype | None) -> Path:
    import onnxruntime as ort

    machine = (platform.machine(), platform.processor(), _cpu_model(), str(torch.get_num_threads()))
    return cache_dir() / "runtime" / (digest(DECISION_VERSION, model_key, str(pp.input_size), str(dtype),
                                             torch.__version__, ort.__version__, *machine) + ".json")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def read_decision(model_key: str, pp: Any, dtype: torch.dtype | None) -> dict[str, Any] | None:
    path = _decision_path(model_key, pp, dtype)
    try:
        return read_json(path) if path.exists() else None
    except ValueError:  # a damaged decision file is measured again, never trusted
        return None


def remember_decision(model_key: str, pp: Any, dtype: torch.dtype | None, decision: dict[str, Any]) -> None:
    write_json(_decision_path(model_key, pp, dtype), decision)
