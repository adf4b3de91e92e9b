"""The runtime for frozen work (runtime.py): ONNX export verified against fp32 torch, the decision remembered,
fallbacks with their reason, and a run evaluated through onnxruntime predicting the same as its test split."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from affinage import runtime as rt
from affinage.backbones import create_model, fingerprint
from affinage.data import load_pixels
from affinage.errors import AffinageError
from affinage.predict import predict_files
from affinage.run import finetune
from affinage.saved import Run


@pytest.fixture()
def tiny_net(tiny_timm: Path):
    return create_model(str(tiny_timm), num_classes=3).eval()


@pytest.fixture()
def pixels(tiny_images: Path, tiny_net) -> np.ndarray:
    files = sorted(p for p in tiny_images.rglob("*.png"))[:20]
    return np.stack([load_pixels(f.read_bytes(), tiny_net.preprocessing) for f in files])


def test_onnx_features_match_fp32_torch_and_the_decision_is_remembered(tiny_net, pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path))
    key, pp = fingerprint(tiny_net), tiny_net.preprocessing
    tiny_net.train()  # the export must give the mode back
    chosen = rt.choose_runtime("onnx", tiny_net, key, pixels, pp, torch.device("cpu"), None, len(pixels))
    assert tiny_net.training
    tiny_net.eval()
    assert chosen.name == "onnx" and chosen.precision == "fp32" and chosen.cache_tag == "onnx-fp32"
    assert chosen.evidence["check_max_rel_error"] <= rt.TOLERANCE
    assert set(chosen.evidence["img_s"]) == {"torch fp32", "onnx fp32"}
    x = rt._check_batch(pixels, pp)
    with torch.no_grad():
        reference = tiny_net.forward_features(x)
    got = chosen.features_of(pixels, list(range(len(x))))  # uint8 in: crop in numpy, normalisation in the graph
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4)
    assert rt.onnx_path(key, pp).is_file()
    # remembered: without the network (a backbone card run), auto reuses the decision and the export
    remembered = rt.choose_runtime("auto", None, key, pixels, pp, torch.device("cpu"), None, 1)
    decision = rt.read_decision(key, pp, None)
    assert decision is not None and remembered.name == decision["runtime"]


def test_auto_keeps_torch_for_small_jobs_and_says_why(tiny_net, pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path))
    chosen = rt.choose_runtime("auto", tiny_net, fingerprint(tiny_net), pixels, tiny_net.preprocessing,
                               torch.device("cpu"), None, len(pixels))
    assert chosen.name == "torch" and f"fewer than {rt.PROBE_MIN_IMAGES}" in chosen.reason
    assert not rt.onnx_path(fingerprint(tiny_net), tiny_net.preprocessing).exists()  # nothing exported


def test_a_failed_check_falls_back_to_torch_with_the_reason(tiny_net, pixels, tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(rt, "TOLERANCE", -1.0)  # no export can pass this check
    said: list[str] = []
    chosen = rt.choose_runtime("onnx", tiny_net, fingerprint(tiny_net), pixels, tiny_net.preprocessing,
                               torch.device("cpu"), None, len(pixels), said.append)
    assert chosen.name == "torch" and "failed its check" in chosen.reason
    assert any("--runtime onnx not used" in line for line in said)


def test_unknown_runtime_and_missing_onnxruntime_are_one_line_errors(tiny_net, pixels, monkeypatch):
    with pytest.raises(AffinageError, match="unknown runtime 'tensorrt'"):
        rt.choose_runtime("tensorrt", tiny_net, "k", pixels, tiny_net.preprocessing, torch.device("cpu"), None, 1)
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(AffinageError, match="needs onnxruntime"):
        rt.choose_runtime("onnx", tiny_net, "k", pixels, tiny_net.preprocessing, torch.device("cpu"), None, 1)
    chosen = rt.choose_runtime("auto", tiny_net, "k", pixels, tiny_net.preprocessing, torch.device("cpu"), None, 999)
    assert chosen.name == "torch" and "not installed" in chosen.reason


def test_a_run_on_onnx_features_records_it_and_predicts_its_test_split(tiny_images, tiny_timm, tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    finetune(data=str(tiny_images), model=str(tiny_timm), strategy="linear-probe", runtime="onnx", out=out,
             progress=False, log=lambda _: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["feature_runtime"]["runtime"] == "onnx"
    assert metrics["model"]["inference_precision"] == "fp32"
    run = Run.load(out)
    assert run.info.extra.get("runtime") == "onnx" and run.runtime(torch.device("cpu")).name == "onnx"
    with open(out / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    results = predict_files(run, [r["path"] for r in rows], top_k=1)
    assert [r["label"] for r in results] == [row["predicted"] for row in rows]
    for result, row in zip(results, rows):  # the same runtime and precision as the test evaluation: no bf16 slack
        assert result["probability"] == pytest.approx(float(row["probability"]), abs=1e-4)
    # a machine without the export makes it again; the answers stay the same
    for path in (tmp_path / "cache" / "onnx").iterdir():
        path.unlink()
    again = predict_files(Run.load(out), [r["path"] for r in rows], top_k=1)
    assert [r["probability"] for r in again] == pytest.approx([r["probability"] for r in results], abs=1e-5)
