"""Strategies end to end on tiny local backbones (transformers ViT folder, timm Hub folder), and the
parameter-group rules they rely on (what trains, at which LR, with which weight decay)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CLASSES, load_safetensors

from affinage.backbones import ImageClassifier, create_model
from affinage.errors import AffinageError
from affinage.run import Run, finetune
from affinage.strategies import freeze_all_but, get_strategy, param_groups

STRATEGIES = ["linear-probe", "head", "partial:1", "partial:2", "full", "progressive"]
BACKBONES = ["hf-vit", "timm-resnet"]
EPOCHS = 2  # fine-tuning epochs for the strategies that train the backbone


def _quiet(_: str) -> None:
    pass


def expected_depth(strategy: str, model: ImageClassifier) -> int:
    """Backbone blocks (stem counted) that a strategy trains at some point during EPOCHS epochs, written out
    independently of the library's strategy classes."""
    total = len(model.block_names) + 1
    if strategy in ("linear-probe", "head"):
        return 0
    if strategy.startswith("partial:"):
        return min(int(strategy.split(":")[1]), total)
    return total  # full; progressive reaches every block by its last epoch


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory, tiny_backbones, tiny_images):
    """One finetune per (backbone, strategy), shared by the tests of this module."""
    cache: dict[tuple[str, str], Run] = {}

    def get(backbone: str, strategy: str) -> Run:
        if (backbone, strategy) not in cache:
            out = tmp_path_factory.mktemp("runs") / f"{backbone}-{strategy.replace(':', '')}"
            epochs = None if strategy in ("linear-probe", "head") else EPOCHS
            cache[(backbone, strategy)] = finetune(
                data=str(tiny_images), model=str(tiny_backbones[backbone]), strategy=strategy, out=out,
                progress=False, log=_quiet, epochs=epochs, pretrained=True, seed=0,
                batch_size=None if epochs is None else 8)
        return cache[(backbone, strategy)]

    return get


@pytest.fixture(scope="module")
def reference(tiny_backbones):
    """The backbone weights each tiny checkpoint loads to, before any training."""
    refs = {}
    for name, folder in tiny_backbones.items():
        model = create_model(str(folder), num_classes=len(CLASSES), pretrained=True)
        refs[name] = model
    return refs


# ----------------------------------------------------------------------------------------------
# End to end: every strategy x both tiny backbones
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_run_directory_is_complete(run_cache, backbone, strategy, tiny_images, tiny_backbones):
    run = run_cache(backbone, strategy)
    root = run.path
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert config["strategy"] == strategy
    assert config["data"] == str(tiny_images)
    assert config["model"] == str(tiny_backbones[backbone])
    assert config["epochs"] == (None if strategy in ("linear-probe", "head") else EPOCHS)

    all_files = {str(p) for p in tiny_images.rglob("*") if p.is_file()}
    seen: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        with open(root / "splits" / f"{split}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rows, f"{split} split is empty"
        assert set(rows[0]) == {"path", "label", "group", "sha"}
        for row in rows:
            assert Path(row["path"]).parent.name == row["label"]
            assert len(row["sha"]) == 32
        seen[split] = {r["path"] for r in rows}
        # stratified: every class in every split
        assert {r["label"] for r in rows} == set(CLASSES)
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert seen["train"] | seen["val"] | seen["test"] == all_files

    with open(root / "skipped_files.csv", newline="") as fh:
        skipped = list(csv.reader(fh))
    assert skipped == [["path", "reason"]]  # every generated image is readable

    history = json.loads((root / "history.json").read_text())
    assert isinstance(history, list) and history
    phases = {r["phase"] for r in history}
    if strategy == "linear-probe":
        assert phases == {"probe"}  # the tuned probe: one row per C tried
    elif strategy == "head":
        assert phases == {"head"}
    else:
        assert phases == {"head-init", "fine-tune"}  # LP-FT: a linear head on the frozen features, then fine-tuning
        assert max(r["epoch"] for r in history if r["phase"] == "fine-tune") == EPOCHS

    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["strategy"] == strategy
    test = metrics["test"]
    for key in ("accuracy", "loss", "macro_f1", "n", "confusion_matrix", "per_class"):
        assert key in test
    assert test["n"] == len(seen["test"])
    assert 0.0 <= test["accuracy"] <= 1.0 and test["loss"] > 0
    assert sum(map(sum, test["confusion_matrix"])) == test["n"]
    assert metrics["data"]["classes"] == sorted(CLASSES)
    assert run.metrics["test"]["accuracy"] == test["accuracy"]

    state = load_safetensors(root / "model" / "model.safetensors")
    assert any(k.startswith("backbone.") for k in state) and any(k.startswith("heads.label.") for k in state)
    info = json.loads((root / "model" / "model.json").read_text())
    assert info["classes"] == sorted(CLASSES) and info["strategy"] == strategy


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_parameters_unchanged_trainable_changed(run_cache, reference, backbone, strategy):
    run = run_cache(backbone, strategy)
    ref = reference[backbone]
    state = load_safetensors(run.path / "model" / "model.safetensors")
    blocks = ref.blocks()
    depth = expected_depth(strategy, ref)
    trainable = {n for block in blocks[len(blocks) - depth:] for n, _ in block} if depth else set()
    frozen = {n for n, _ in ref.backbone.named_parameters()} - trainable
    if strategy in ("linear-probe", "head", "partial:1", "partial:2"):
        assert frozen, "these strategies must leave some of the backbone frozen"
    else:
        assert not frozen

    for name in frozen:
        assert torch.equal(state[f"backbone.{name}"], ref.backbone.state_dict()[name]), f"frozen {name} changed"

    history = json.loads((run.path / "history.json").read_text())
    fine = [r for r in history if r["phase"] == "fine-tune"]
    if fine:
        # the kept weights come from an epoch after the start (the tiny data keeps improving val loss) ...
        best = max(fine, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
        assert best["epoch"] >= 1
        # ... so every backbone parameter the strategy trained by then has moved (progressive unfreezes the lower
        # blocks in later epochs: those count only when the kept epoch is one they trained in)
        if strategy == "progressive":
            from affinage.strategies import get_strategy

            kept = max(r["epoch"] for r in fine if (r["val_accuracy"], -r["val_loss"]) == (best["val_accuracy"], -best["val_loss"]))
            reached = get_strategy("progressive").trainable_depth(ref, kept - 1, EPOCHS)
            trainable = {n for block in blocks[len(blocks) - reached:] for n, _ in block}
        unchanged = [n for n in trainable if torch.equal(state[f"backbone.{n}"], ref.backbone.state_dict()[n])]
        assert not unchanged, f"trainable parameters did not change: {unchanged[:5]}"
    # the head is sized for the classes
    head_keys = [k for k in state if k.startswith("heads.label.")]
    assert state[head_keys[-1]].shape[0] == len(CLASSES)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trainable_parameter_counts(run_cache, reference, backbone, strategy):
    run = run_cache(backbone, strategy)
    ref = reference[backbone]
    head = sum(p.numel() for p in run.model.head.parameters())
    blocks = ref.blocks()
    depth = expected_depth(strategy, ref)
    backbone_trained = sum(p.numel() for block in blocks[len(blocks) - depth:] for _, p in block) if depth else 0
    assert run.metrics["model"]["trainable_params"] == head + backbone_trained
    history = json.loads((run.path / "history.json").read_text())
    counts = [r["trainable_params"] for r in history if r["phase"] == "fine-tune" and r["epoch"] >= 1]
    if strategy == "progressive":
        assert counts[0] < counts[-1] == head + backbone_trained  # more blocks train in the later epoch
    elif counts:
        assert set(counts) == {head + backbone_trained}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_beats_chance_and_reload_predicts_the_same(run_cache, backbone, strategy):
    run = run_cache(backbone, strategy)
    chance = 1 / len(CLASSES)
    # 6 test images of 3 well-separated classes; the tiny models reach 1.0 here, chance is 0.33
    assert run.metrics["test"]["accuracy"] >= chance + 0.3

    with open(run.path / "test_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(run.metrics["test"]["accuracy"])

    reloaded = Run.load(run.path)
    assert reloaded.classes == sorted(CLASSES)
    assert reloaded.strategy == strategy
    results = reloaded.predict([r["path"] for r in rows], top_k=3)
    assert [r["label"] for r in results] == [r["predicted"] for r in rows]
    for result, row in zip(results, rows):
        assert result["probability"] == pytest.approx(float(row["probability"]), abs=0.03)
        probs = [t["probability"] for t in result["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
    # the reloaded weights are exactly those saved
    saved = load_safetensors(run.path / "model" / "model.safetensors")
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_batchnorm_statistics_kept_by_default(run_cache, reference):
    """Fine-tuning every layer of a BatchNorm network leaves its running statistics as pretrained."""
    run = run_cache("timm-resnet", "full")
    state = load_safetensors(run.path / "model" / "model.safetensors")
    ref = reference["timm-resnet"].backbone
    buffers = {n: b for n, b in ref.named_buffers() if "running_" in n}
    assert len(buffers) > 10
    for name, value in buffers.items():
        assert torch.equal(state[f"backbone.{name}"], value), name
    # ... while the BatchNorm affine parameters did train
    norms = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    moved = [n for n in norms if not torch.equal(state[f"backbone.{n}.weight"], ref.get_submodule(n).weight)]
    assert len(moved) == len(norms)


def test_batchnorm_statistics_move_with_train_bn_stats(tmp_path, tiny_timm, tiny_images, reference):
    run = finetune(data=str(tiny_images), model=str(tiny_timm), strategy="full", out=tmp_path / "run", progress=False,
                   log=_quiet, epochs=1, batch_size=8, train_bn_stats=True, head_init="random")
    history = json.loads((run.path / "history.json").read_text())
    fine = [r for r in history if r["phase"] == "fine-tune"]
    assert max(fine, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["epoch"] == 1  # the trained weights were kept
    state = load_safetensors(run.path / "model" / "model.safetensors")
    ref = reference["timm-resnet"].backbone
    buffers = {n: b for n, b in ref.named_buffers() if "running_" in n}
    moved = [n for n, b in buffers.items() if not torch.equal(state[f"backbone.{n}"], b)]
    assert len(moved) == len(buffers)


# ----------------------------------------------------------------------------------------------
# Parameter groups on tiny models (no training)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["timm-vit", "hf-vit", "timm-resnet"])
def tiny_model(request, tiny_hf_vit, tiny_timm) -> ImageClassifier:
    torch.manual_seed(0)
    if request.param == "timm-vit":
        return create_model("timm:test_vit", num_classes=3, pretrained=False)
    if request.param == "hf-vit":
        return create_model(str(tiny_hf_vit), num_classes=3, pretrained=False)
    return create_model(str(tiny_timm), num_classes=3, pretrained=False)


def trainable_names(model: ImageClassifier) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_blocks_cover_every_backbone_parameter_once(tiny_model):
    names = [n for block in tiny_model.blocks() for n, _ in block]
    assert sorted(names) == sorted(n for n, _ in tiny_model.backbone.named_parameters())
    assert len(tiny_model.blocks()) >= 3  # a stem and at least two blocks


def test_linear_probe_and_head_train_only_the_head(tiny_model):
    head = {f"heads.label.{n}" for n, _ in tiny_model.head.named_parameters()}
    for name in ("linear-probe", "head"):
        strategy = get_strategy(name)
        assert strategy.uses_cached_features
        count = strategy.apply(tiny_model, 0, 1)
        assert trainable_names(tiny_model) == head
        assert count == sum(p.numel() for p in tiny_model.head.parameters())
    assert get_strategy("head").head_hidden and not get_strategy("linear-probe").head_hidden


def test_partial_trains_only_the_top_blocks(tiny_model):
    blocks = tiny_model.blocks()
    for n in (1, 2):
        get_strategy(f"partial:{n}").apply(tiny_model, 0, 3)
        expected = {f"backbone.{name}" for block in blocks[-n:] for name, _ in block}
        got = trainable_names(tiny_model)
        assert {g for g in got if g.startswith("backbone.")} == expected
        assert {f"heads.label.{n}" for n, _ in tiny_model.head.named_parameters()} <= got
    # more blocks than the model has: everything trains
    get_strategy("partial:99").apply(tiny_model, 0, 3)
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_partial_1_is_the_last_block_and_final_norm(tiny_hf_vit, tiny_timm):
    hf = create_model(str(tiny_hf_vit), num_classes=3, pretrained=False)
    get_strategy("partial:1").apply(hf, 0, 1)
    backbone = {n.removeprefix("backbone.model.") for n in trainable_names(hf) if n.startswith("backbone.")}
    assert backbone and all(n.startswith("layers.1.") or n.startswith("layernorm.") for n in backbone)
    assert any(n.startswith("layernorm.") for n in backbone)

    resnet = create_model(str(tiny_timm), num_classes=3, pretrained=False)
    get_strategy("partial:1").apply(resnet, 0, 1)
    backbone = {n.removeprefix("backbone.") for n in trainable_names(resnet) if n.startswith("backbone.")}
    assert backbone and all(n.startswith("layer4.") for n in backbone)
    assert backbone == {n for n, _ in resnet.backbone.named_parameters() if n.startswith("layer4.")}


def test_full_trains_everything(tiny_model):
    count = get_strategy("full").apply(tiny_model, 0, 3)
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert count == sum(p.numel() for p in tiny_model.parameters())


def test_progressive_unfreezes_more_blocks_in_later_epochs(tiny_model):
    strategy = get_strategy("progressive")
    epochs = 4
    counts, sets = [], []
    for epoch in range(epochs):
        counts.append(strategy.apply(tiny_model, epoch, epochs))
        sets.append(trainable_names(tiny_model))
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert all(a <= b for a, b in zip(sets, sets[1:]))  # never re-freezes
    assert any(n.startswith("backbone.") for n in sets[0])  # it trains some blocks from the first epoch
    assert counts[-1] == sum(p.numel() for p in tiny_model.parameters())  # all of them by the last
    # the top block is trainable before the stem
    top = {f"backbone.{n}" for n, _ in tiny_model.blocks()[-1]}
    stem = {f"backbone.{n}" for n, _ in tiny_model.blocks()[0]}
    assert top <= sets[0] and not stem & sets[0]


def test_layer_decayed_learning_rates_decrease_going_down(tiny_model):
    lr, decay = 1e-3, 0.5
    depth = len(tiny_model.blocks())
    groups = param_groups(tiny_model, depth, lr, 0.05, decay)
    by_name = {}
    for g in groups:
        by_name.setdefault(g["name"].split("/")[0], set()).add(g["lr"])
    assert all(len(v) == 1 for v in by_name.values())  # decay and no-decay halves share the LR
    lrs = {k: v.pop() for k, v in by_name.items()}
    assert lrs["head"] == lr
    order = [f"block{i}" for i in range(depth - 1, 0, -1)] + ["stem"]  # top block first
    assert list(lrs) == ["head"] + order
    values = [lrs[k] for k in ["head"] + order]
    assert all(a > b for a, b in zip(values, values[1:]))
    for k, name in enumerate(order, start=1):
        assert lrs[name] == pytest.approx(lr * decay ** k)
    for g in groups:
        assert g["initial_lr"] == g["lr"]
    # every parameter appears exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny_model.parameters()))


def test_param_groups_cover_only_what_the_strategy_trains(tiny_model):
    hp = {"epochs": 3, "lr": 1e-3, "weight_decay": 0.05, "layer_decay": 0.7}
    for name in ("partial:1", "partial:2", "full"):
        strategy = get_strategy(name)
        groups = strategy.param_groups(tiny_model, hp)
        strategy.apply(tiny_model, 0, hp["epochs"])
        in_groups = {id(p) for g in groups for p in g["params"]}
        assert in_groups == {id(p) for p in tiny_model.parameters() if p.requires_grad}


def test_no_weight_decay_on_biases_norms_and_embeddings(tiny_model):
    groups = param_groups(tiny_model, len(tiny_model.blocks()), 1e-3, 0.05, 0.8)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert no_decay and decay and not no_decay & decay
    for g in groups:
        assert g["weight_decay"] in (0.0, 0.05)
        assert g["name"].endswith("/no_decay") == (g["weight_decay"] == 0.0)
    for n in decay:
        param = dict(tiny_model.named_parameters())[n]
        assert param.ndim > 1, f"{n} (ndim {param.ndim}) is decayed"
        assert "norm" not in n.split(".")[-2] and not n.endswith(".bias")
        assert not any(w in n for w in ("pos_embed", "position_embeddings", "cls_token"))
    for n, p in tiny_model.named_parameters():
        if n.endswith(".bias") or p.ndim == 1:
            assert n in no_decay, f"{n} is decayed"
        if any(w in n for w in ("pos_embed", "position_embeddings", "cls_token")):
            assert n in no_decay, f"{n} is decayed"
    assert "heads.label.weight" in decay and "heads.label.bias" in no_decay


def test_freeze_all_but_zero_keeps_head_trainable(tiny_model):
    count = freeze_all_but(tiny_model, 0)
    assert count == sum(p.numel() for p in tiny_model.head.parameters())
    assert not any(p.requires_grad for p in tiny_model.backbone.parameters())


def test_strategy_names_are_validated():
    assert get_strategy("probe").name == "linear-probe"
    assert get_strategy("PARTIAL:3").name == "partial:3"
    for bad in ("partial:0", "partial:x", "lorax", ""):
        with pytest.raises(AffinageError, match="unknown strategy"):
            get_strategy(bad)
