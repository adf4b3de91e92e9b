"""Several processes on CPU (gloo): two ranks started by torchrun train together with `fit` and infer sharded, and
agree with each other and with one process. The workers are this file, run as a script by torchrun (`--worker`)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

N_CLASSES = 3
TRAIN, VAL, INFER = 24, 9, 7  # odd sizes: uneven shards and an uneven last val batch on two ranks
WORKER_TIMEOUT = 240  # seconds; a rank stuck in a collective would otherwise hang the suite


# ----------------------------------------------------------------------------------------------
# Scenarios: run in each of two ranks, and in one process (the pytest process) for the reference
# ----------------------------------------------------------------------------------------------
def _pixels(n: int, size: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(n, 3, size, size) uint8 images whose class is their dominant colour, with noise."""
    rng = np.random.default_rng(seed)
    labels = [i % N_CLASSES for i in range(n)]
    pixels = rng.normal(110, 25, size=(n, 3, size, size))
    for i, c in enumerate(labels):
        pixels[i, c] += 70
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def _model(timm_folder: str) -> Any:
    from affinage.backbones import create_model

    torch.manual_seed(0)
    return create_model(timm_folder, num_classes=N_CLASSES, pretrained=True)


def _datasets(net: Any) -> tuple[Any, Any]:
    from affinage.data import PixelDataset, eval_transform

    size = net.preprocessing.stored_size
    train_px, train_y = _pixels(TRAIN, size, 1)
    val_px, val_y = _pixels(VAL, size, 2)
    transform = eval_transform(net.preprocessing)
    return (PixelDataset(train_px, range(TRAIN), train_y, transform),
            PixelDataset(val_px, range(VAL), val_y, transform))


def _settings(**kw: Any) -> Any:
    from affinage.inference import Precision
    from affinage.train import LoopSettings

    base = dict(epochs=3, batch_size=8, label_smoothing=0.0, warmup_epochs=0.0, patience=2, seed=0,
                precision=Precision("no", "fp32"), progress=False)
    return LoopSettings(**{**base, **kw})


def fit_progressive(timm_folder: str, checkpoint: Path | None, log: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Progressive unfreezing (blocks join the optimizer epoch by epoch), BatchNorms in eval: what two processes do
    must be what one does."""
    from affinage.strategies import get_strategy, set_norms_eval
    from affinage.train import fit

    net = _model(timm_folder)
    strategy = get_strategy("progressive")
    hp = {"epochs": 3, "lr": 3e-3, "weight_decay": 0.05, "layer_decay": 0.7, "lr_min": None}
    groups = strategy.param_groups(net, hp)
    strategy.apply(net, 0, hp["epochs"])
    train, val = _datasets(net)
    result = fit(net, train, val, groups, _settings(checkpoint=checkpoint, phase="fine-tune"),
                 on_epoch_start=lambda e: strategy.apply(net, e, hp["epochs"]),
                 after_train_mode=lambda m: set_norms_eval(m, True), log=log)
    return result, {k: v.detach().clone() for k, v in net.state_dict().items()}


def fit_bn_stats_unused_param(timm_folder: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """partial:1 with BatchNorm statistics moving in the trained block (--train-bn-stats), and a parameter the forward
    pass never uses (like an HF pooler) in the optimizer: DDP must neither stop nor let the ranks' statistics drift;
    frozen BatchNorms keep their statistics."""
    from affinage.strategies import decay_groups, get_strategy, set_norms_eval
    from affinage.train import fit

    net = _model(timm_folder)
    net.unused = torch.nn.Linear(2, 2)
    strategy = get_strategy("partial:1")
    hp = {"epochs": 2, "lr": 3e-3, "weight_decay": 0.05, "layer_decay": 0.7, "lr_min": None}
    groups = strategy.param_groups(net, hp) + decay_groups("unused", list(net.unused.named_parameters()), 1e-3, 0.0)
    strategy.apply(net, 0, hp["epochs"])  # it sets the backbone's and head's requires_grad; `unused` keeps its own
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train, val = _datasets(net)
    fit(net, train, val, groups, _settings(epochs=2, phase="bn"),
        on_epoch_start=lambda e: strategy.apply(net, e, hp["epochs"]),
        after_train_mode=lambda m: set_norms_eval(m, False), log=lambda _: None)
    return before, {k: v.detach().clone() for k, v in net.state_dict().items()}


def fit_head_alone() -> tuple[Any, dict[str, torch.Tensor]]:
    """A head on (cached) features with `distributed=False`: every process trains the same head on all the data."""
    from affinage.strategies import decay_groups
    from affinage.train import fit

    features = torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], N_CLASSES)
    y = torch.arange(len(features)) % N_CLASSES
    data = torch.utils.data.TensorDataset(features, y)
    groups = decay_groups("head", list(head.named_parameters()), 1e-2, 1e-3)
    result = fit(head, data, data, groups, _settings(epochs=5, batch_size=4, phase="head", distributed=False),
                 log=lambda _: None)
    return result, {k: v.detach().clone() for k, v in head.state_dict().items()}


def infer(timm_folder: str) -> torch.Tensor:
    """Pooled features of INFER images (uneven shards), through run_batches."""
    from affinage.inference import run_batches

    net = _model(timm_folder).eval()
    pixels, _ = _pixels(INFER, net.preprocessing.stored_size, 3)
    return run_batches(net.forward_features, pixels, list(range(INFER)), net.preprocessing, torch.device("cpu"), None,
                       progress=False)


def _history(result: Any) -> list[tuple[Any, ...]]:
    """What must agree across ranks: every figure of every epoch but its duration."""
    return [(r.epoch, r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy, r.lr, r.trainable_params)
            for r in result.history]


# ----------------------------------------------------------------------------------------------
# The worker: one rank
# ----------------------------------------------------------------------------------------------
def _worker(out: Path, timm_folder: str) -> None:
    from affinage import distributed, inference, train

    torch.set_num_threads(1)
    rank = distributed.rank()
    saves: list[str] = []
    real_save = train.save_checkpoint
    train.save_checkpoint = lambda path, state: (saves.append(str(path)), real_save(path, state))[1]
    writes: list[str] = []
    real_atomic = inference.atomic_path

    @contextlib.contextmanager
    def slow_atomic_path(path: Path) -> Iterator[Path]:
        """Records the cache writes; slow, so that a rank that does not wait for the file would miss it."""
        writes.append(str(path))
        time.sleep(0.5)
        with real_atomic(path) as tmp:
            yield tmp

    inference.atomic_path = slow_atomic_path
    logged: list[str] = []

    progressive, weights = fit_progressive(timm_folder, out / "checkpoint" / "fine-tune.pt", logged.append)
    bn_before, bn_after = fit_bn_stats_unused_param(timm_folder)
    features = infer(timm_folder)
    net = _model(timm_folder).eval()
    pixels, _ = _pixels(INFER, net.preprocessing.stored_size, 3)
    hashes = [f"image-{i}" for i in range(INFER)]
    cached_first = inference.cached_features(net, "tiny", pixels, hashes, net.preprocessing, torch.device("cpu"), None,
                                             progress=False)
    cached_again = inference.cached_features(net, "tiny", pixels, hashes, net.preprocessing, torch.device("cpu"), None,
                                             progress=False)
    head, head_weights = fit_head_alone()
    uneven = distributed.gather(torch.full((rank + 1, 2), float(rank)))  # rank 0: 1 row, rank 1: 2 rows
    torch.save({
        "rank": rank, "world_size": distributed.world_size(), "is_main": distributed.is_main(),
        "history": _history(progressive), "best_epoch": progressive.best_epoch,
        "stopped_early": progressive.stopped_early, "weights": weights, "saves": saves, "logged": logged,
        "bn_before": bn_before, "bn_after": bn_after, "features": features,
        "cached_first": (cached_first[0], cached_first[1]), "cached_again": (cached_again[0], cached_again[1]),
        "cache_writes": writes, "head_history": _history(head), "head_weights": head_weights,
        "shard": distributed.shard(list(range(INFER))), "uneven": uneven,
        "broadcast": distributed.broadcast_object(f"run-dir-of-rank-{rank}"),
    }, out / f"rank{rank}.pt")


def _run_launcher(cmd: list[str], cache: Path | None = None) -> str:
    """Run a launcher command (CPU processes, one thread each) to its end; its output. A launch still running after
    WORKER_TIMEOUT (ranks waiting on each other) is killed with all its processes, and fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # gloo CPU ranks even beside GPUs
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["AFFINAGE_CACHE_DIR"] = str(cache)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {WORKER_TIMEOUT}s (ranks waiting on each other?):\n"
                    f"{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _launch(out: Path, timm_folder: Path) -> None:
    """torchrun (the module behind the command) with two CPU ranks running `_worker`."""
    _run_launcher([*TORCHRUN, __file__, "--worker", str(out), str(timm_folder)], cache=out / "cache")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_timm: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("two_ranks")
    _launch(out, tiny_timm)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return ranks[0], ranks[1], out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_timm: Path) -> dict[str, Any]:
    """The same worker in one plain process on CPU (the pytest process may have a GPU): the reference."""
    out = tmp_path_factory.mktemp("one_process")
    _run_launcher([sys.executable, __file__, "--worker", str(out), str(tiny_timm)], cache=out / "cache")
    return torch.load(out / "rank0.pt", weights_only=False)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def test_two_ranks_train_one_model_and_agree_on_every_decision(two_ranks):
    r0, r1, out = two_ranks
    assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
    assert r0["is_main"] and not r1["is_main"]
    assert r0["history"] == r1["history"], "val figures (hence early stopping) must be identical on every rank"
    assert len(r0["history"]) == 4  # epoch 0 (the start) and 3 trained epochs
    assert (r0["best_epoch"], r0["stopped_early"]) == (r1["best_epoch"], r1["stopped_early"])
    assert _same_tensors(r0["weights"], r1["weights"]) == [], "both ranks must keep the same weights"
    trainable = [h[-1] for h in r0["history"][1:]]
    assert trainable == sorted(trainable) and trainable[0] < trainable[-1], f"blocks unfreeze epoch by epoch: {trainable}"


def test_only_the_main_rank_logs_and_writes_the_checkpoint(two_ranks):
    r0, r1, out = two_ranks
    assert r0["saves"] and r1["saves"] == []
    assert (out / "checkpoint" / "fine-tune.pt").is_file()
    assert any("fine-tune epoch 3/3" in line for line in r0["logged"]) and r1["logged"] == []


def test_two_ranks_train_as_one_process(two_ranks, one_process):
    """Each rank takes half of every batch and DDP averages the gradients: the same optimisation as one process
    (up to float summation order), including blocks that join the optimizer later (their gradients are dropped
    while frozen, so AdamW builds no state for them, as requires_grad=False does in one process)."""
    r0, _, _ = two_ranks
    reference, weights = one_process["history"], one_process["weights"]
    assert one_process["world_size"] == 1
    assert [h[0] for h in r0["history"]] == [h[0] for h in reference]
    assert [h[4] for h in r0["history"]] == [h[4] for h in reference], "val accuracy per epoch"
    assert [h[6] for h in r0["history"]] == [h[6] for h in reference], "trainable parameters per epoch"
    np.testing.assert_allclose([h[3] for h in r0["history"]], [h[3] for h in reference], rtol=1e-4)
    np.testing.assert_allclose([h[1] for h in r0["history"][1:]], [h[1] for h in reference[1:]], rtol=1e-4)
    assert r0["best_epoch"] == one_process["best_epoch"]
    # Adam divides by the gradient's running scale, so float-order noise in near-zero gradients shows up to ~1e-4 in
    # a weight; the training itself moves weights by ~1e-2 (3 epochs at lr 3e-3)
    for name, value in weights.items():
        torch.testing.assert_close(r0["weights"][name], value, rtol=0, atol=5e-4, msg=name)


def test_batchnorm_statistics_and_unused_parameters_under_ddp(two_ranks):
    r0, r1, _ = two_ranks
    assert _same_tensors(r0["bn_after"], r1["bn_after"]) == [], "the ranks' BatchNorm statistics must not drift apart"
    stats = [k for k in r0["bn_before"] if k.endswith("running_mean")]
    moved = [k for k in stats if not torch.equal(r0["bn_before"][k], r0["bn_after"][k])]
    assert moved, "the trained block's BatchNorm statistics move with --train-bn-stats"
    assert len(moved) < len(stats), "frozen BatchNorms keep their statistics"
    assert torch.equal(r0["bn_before"]["unused.weight"], r0["bn_after"]["unused.weight"])


def test_sharded_inference_gathers_what_one_process_computes(two_ranks, one_process):
    r0, r1, _ = two_ranks
    assert r0["shard"] == [0, 1, 2, 3] and r1["shard"] == [4, 5, 6]
    single = one_process["features"]
    assert r0["features"].shape == single.shape == r1["features"].shape
    assert torch.equal(r0["features"], r1["features"])
    torch.testing.assert_close(r0["features"], single, rtol=1e-5, atol=1e-6)


def test_cached_features_computed_together_written_once(two_ranks):
    r0, r1, out = two_ranks
    (f0, hit0), (f1, hit1) = r0["cached_first"], r1["cached_first"]
    assert (hit0, hit1) == (False, False) and torch.equal(f0, f1) and torch.equal(f0, r0["features"])
    assert len(r0["cache_writes"]) == 1 and r1["cache_writes"] == [], "only the main rank writes the cache file"
    assert Path(r0["cache_writes"][0]).is_file() and str(out / "cache") in r0["cache_writes"][0]
    (g0, again0), (g1, again1) = r0["cached_again"], r1["cached_again"]
    assert (again0, again1) == (True, True) and torch.equal(g0, f0) and torch.equal(g1, f0)


def test_a_head_trained_alone_in_each_rank_is_the_same_everywhere(two_ranks, one_process):
    r0, r1, _ = two_ranks
    assert r0["head_history"] == r1["head_history"]
    assert _same_tensors(r0["head_weights"], r1["head_weights"]) == []
    assert r0["head_history"] == one_process["head_history"], "distributed=False trains exactly as one process"
    assert _same_tensors(r0["head_weights"], one_process["head_weights"]) == []


def test_gather_drops_the_padding_of_uneven_shards_and_broadcast_comes_from_main(two_ranks):
    r0, r1, _ = two_ranks
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert torch.equal(r0["uneven"], expected) and torch.equal(r1["uneven"], expected)
    assert r0["broadcast"] == r1["broadcast"] == "run-dir-of-rank-0"


def test_one_process_is_the_identity_and_imports_nothing():
    code = ("import sys\nfrom affinage import distributed as d\n"
            "assert (d.is_main(), d.rank(), d.world_size(), d.launched()) == (True, 0, 1, False)\n"
            "x = object()\nassert d.gather(x) is x and d.broadcast_object(x) is x and d.all_true(True)\n"
            "assert d.shard([5, 6, 7]) == [5, 6, 7]\nd.barrier()\nd.sync_buffers(None)\n"
            "with d.main_first():\n    pass\n"
            "assert 'accelerate' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_shard_bounds_cover_every_item_once():
    from affinage.distributed import shard_bounds

    for n in range(0, 12):
        for ranks in (1, 2, 3, 5):
            bounds = shard_bounds(n, ranks)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_a_cpu_launch_that_started_one_process_says_so(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process: it must not run alone silently."""
    from affinage import distributed

    monkeypatch.setattr(distributed, "_warned_single_cpu_launch", False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    said: list[str] = []
    distributed.warn_single_cpu_launch(said.append)
    distributed.warn_single_cpu_launch(said.append)
    assert len(said) == 1 and "--multi_gpu --num_processes" in said[0] and "torchrun" in said[0]
    monkeypatch.delenv("MASTER_ADDR")  # accelerate sets it only when asked for several processes
    monkeypatch.setattr(distributed, "_warned_single_cpu_launch", False)
    distributed.warn_single_cpu_launch(said.append)
    assert len(said) == 1


def test_frozen_groups_under_ddp_neither_move_nor_get_optimizer_state():
    """The mechanism behind unfreezing with a fixed parameter set: a frozen group requires grad (DDP sees it from
    the start) but its gradient is dropped before the step, so AdamW leaves it bit-identical and stateless."""
    from affinage.train import _FrozenUnderDDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2, "weight_decay": 0.05},
              {"params": list(model[1].parameters()), "lr": 1e-2, "weight_decay": 0.05}]
    model[0].requires_grad_(False)  # the strategy's choice for this epoch
    frozen = _FrozenUnderDDP(groups, active=True)
    assert all(p.requires_grad for p in model.parameters()), "every parameter that may train requires grad"
    before = [p.detach().clone() for p in model[0].parameters()]
    optimizer = torch.optim.AdamW(groups)
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        frozen.drop_frozen_grads()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(model[0].parameters(), before))
    assert all(p not in optimizer.state for p in model[0].parameters())
    assert all(p in optimizer.state for p in model[1].parameters())
    with frozen.as_strategy_set():
        assert not any(p.requires_grad for p in model[0].parameters())
    frozen.restore()
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


# ----------------------------------------------------------------------------------------------
# The command line, end to end: the two forms the README gives
# ----------------------------------------------------------------------------------------------
def _check_run(out: Path, output: str, processes: int) -> dict[str, Any]:
    """One complete run directory written once, by the main process, which alone printed."""
    from affinage.saved import Run

    for name in ("config.yaml", "metrics.json", "history.json", "test_predictions.csv", "model", "splits"):
        assert (out / name).exists(), f"{name} missing from the run directory; output:\n{output[-3000:]}"
    assert not (out / "checkpoint").exists()
    assert output.count("test accuracy ") == 1 and output.count("affinage: ") == 1, output[-3000:]
    run = Run.load(out)
    assert run.metrics["distributed"]["world_size"] == processes
    assert run.metrics["test"]["n"] == len((out / "splits" / "test.csv").read_text().splitlines()) - 1
    return run.metrics


def test_torchrun_cli_trains_with_two_processes_as_one(tmp_path, tiny_images, tiny_timm):
    """`torchrun --nproc_per_node 2 -m affinage.cli train ...`: DDP fine-tuning (partial:1), sharded features and
    test logits; the test block is computed once over the whole test split, as one process computes it."""
    args = ["--data", str(tiny_images), "--model", str(tiny_timm), "--strategy", "partial:1", "--epochs", "2"]
    output = _run_launcher([*TORCHRUN, "-m", "affinage.cli", "train", *args, "--out", str(tmp_path / "two"), "--quiet"])
    two = _check_run(tmp_path / "two", output, 2)
    output = _run_launcher([sys.executable, "-m", "affinage.cli", "train", *args, "--out", str(tmp_path / "one"), "--quiet"])
    one = _check_run(tmp_path / "one", output, 1)
    assert two["test"]["n"] == one["test"]["n"]
    assert abs(two["test"]["accuracy"] - one["test"]["accuracy"]) <= 0.01
    assert (tmp_path / "two" / "splits" / "test.csv").read_text() == (tmp_path / "one" / "splits" / "test.csv").read_text()


def test_accelerate_launch_multi_gpu_form_starts_two_cpu_processes(tmp_path, tiny_images, tiny_timm):
    """`accelerate launch --multi_gpu --num_processes 2 -m affinage.cli train ...` on a machine without GPUs: two
    gloo CPU processes (accelerate's `--cpu --num_processes 2` starts one: see the test below)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = ["--data", str(tiny_images), "--model", str(tiny_timm), "--strategy", "linear-probe"]
    output = _run_launcher([*launcher, "-m", "affinage.cli", "train", *args, "--out", str(tmp_path / "run"), "--quiet"])
    _check_run(tmp_path / "run", output, 2)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]), sys.argv[3])
