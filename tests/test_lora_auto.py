"""LoRA through peft (adapters + head saved, merged model reloads exactly), discriminative LRs, and `auto`'s
choice from data size and domain distance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CLASSES, load_safetensors

from affinage.auto import domain_evidence, trial_order
from affinage.backbones import create_model
from affinage.cli import main
from affinage.config import TrainConfig
from affinage.errors import AffinageError
from affinage.run import Run, evaluate_run, finetune
from affinage.strategies import get_strategy, lora_targets, param_groups


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_backbones, tiny_images):
    runs = {}
    for name, folder in tiny_backbones.items():
        out = tmp_path_factory.mktemp("lora") / name
        runs[name] = finetune(data=str(tiny_images), model=str(folder), strategy="lora", out=out, progress=False,
                              log=_quiet, epochs=2, batch_size=8, seed=0)
    return runs


@pytest.mark.parametrize("backbone", ["hf-vit", "timm-resnet"])
def test_lora_trains_adapters_and_head_and_saves_both(lora_runs, tiny_backbones, backbone):
    run = lora_runs[backbone]
    assert run.metrics["strategy"] == "lora" and run.strategy == "lora"
    assert run.metrics["test"]["accuracy"] >= 1 / len(CLASSES) + 0.3
    ref = create_model(str(tiny_backbones[backbone]), num_classes=len(CLASSES), pretrained=True)
    targets = {t.removeprefix("backbone.") for t in lora_targets(ref)}
    assert targets
    saved = load_safetensors(run.path / "model" / "model.safetensors")
    base = ref.backbone.state_dict()
    # the merged model: adapted layers' weights moved, every other backbone tensor is exactly the pretrained one
    moved = {n for n, t in base.items() if not torch.equal(saved[f"backbone.{n}"], t)}
    assert moved and all(n.rsplit(".", 1)[0] in targets and n.endswith("weight") for n in moved)
    assert not any(k.startswith("base_model") or "lora_" in k for k in saved)  # a plain model, no peft names

    # peft's adapter folder carries the trained head too (the known failure: head not saved)
    adapter = load_safetensors(run.path / "model" / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("head" in k for k in adapter)
    config = json.loads((run.path / "model" / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["heads.label"] and config["r"] == 8

    # trainable = adapters + head, far fewer than the backbone
    history = json.loads((run.path / "history.json").read_text())
    trained = {r["trainable_params"] for r in history if r["phase"] == "fine-tune" and r["epoch"] >= 1}
    assert len(trained) == 1 and trained.pop() == run.metrics["model"]["trainable_params"]
    assert run.metrics["model"]["trainable_params"] < sum(t.numel() for t in base.values())


def test_lora_adapter_reloads_to_the_saved_predictions(lora_runs, tiny_backbones):
    from peft import PeftModel

    run = lora_runs["hf-vit"]
    base = create_model(str(tiny_backbones["hf-vit"]), num_classes=len(CLASSES), pretrained=True).eval()
    with_adapter = PeftModel.from_pretrained(base, str(run.path / "model" / "adapter")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = Run.load(run.path).model(x)
        got = with_adapter(x)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("backbone", ["hf-vit", "timm-resnet"])
def test_lora_eval_reproduces_test_accuracy_exactly(lora_runs, backbone):
    run = lora_runs[backbone]
    test = evaluate_run(run.path, progress=False)
    assert test["accuracy"] == run.metrics["test"]["accuracy"]
    assert test["confusion_matrix"] == run.metrics["test"]["confusion_matrix"]


def test_lora_param_groups_hold_only_adapters_and_head(tiny_hf_vit):
    model = create_model(str(tiny_hf_vit), num_classes=3, pretrained=False)
    strategy = get_strategy("lora")
    hp = strategy.resolve(TrainConfig(data="x", strategy="lora", lora_rank=4))
    wrapped = strategy.wrap(model, hp)
    groups = strategy.param_groups(wrapped, hp)
    names = {id(p): n for n, p in wrapped.named_parameters()}
    in_groups = {names[id(p)] for g in groups for p in g["params"]}
    assert in_groups == {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".heads.label." in n for n in in_groups)
    assert {g["lr"] for g in groups} == {hp["lr"]}
    assert {g["name"] for g in groups} >= {"head", "head/no_decay", "lora"}
    for g in groups:
        assert (g["weight_decay"] == 0.0) == g["name"].endswith("/no_decay")
    assert strategy.apply(wrapped, 0, 3) == sum(p.numel() for g in groups for p in g["params"])


def test_lora_targets_skip_depthwise_and_dynamically_padded_convs():
    model = create_model("timm:tf_efficientnet_lite0", num_classes=3, pretrained=False)
    targets = lora_targets(model)
    modules = dict(model.named_modules())
    assert targets and all(modules[t].groups == 1 for t in targets if isinstance(modules[t], torch.nn.Conv2d))
    assert all(type(modules[t]) in (torch.nn.Conv2d, torch.nn.Linear) for t in targets)
    assert "backbone.conv_head" in targets  # a 1x1 conv: it gets an adapter like the others
    wrapped = get_strategy("lora").wrap(model, {"lora_rank": 4, "lora_alpha": 8})
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("heads.label.modules_to_save" in n for n in trainable)  # the head trains whole, saved with the adapter
    assert not any("conv_head" in n and "lora_" not in n for n in trainable)
    with torch.no_grad():
        assert wrapped(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# Discriminative learning rates
# ----------------------------------------------------------------------------------------------
def test_discriminative_lrs_spread_from_lr_down_to_lr_min(tiny_hf_vit):
    model = create_model(str(tiny_hf_vit), num_classes=3, pretrained=False)
    depth = len(model.blocks())
    groups = param_groups(model, depth, 1e-3, 0.05, 0.5, lr_min=1e-5)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs["head"] == 1e-3 and lrs["stem"] == pytest.approx(1e-5)
    ordered = [lrs["head"]] + [lrs[f"block{i}"] for i in range(depth - 1, 0, -1)] + [lrs["stem"]]
    ratios = [a / b for a, b in zip(ordered, ordered[1:])]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))  # geometric, like fastai's slice(lr_min, lr)
    # partial: the lowest *trained* block gets lr_min
    groups = param_groups(model, 1, 1e-3, 0.05, 0.5, lr_min=1e-5)
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-5, 1e-3])


@pytest.mark.parametrize("strategy", ["partial:2", "full", "progressive"])
def test_strategies_take_lr_min_or_layer_decay(tiny_hf_vit, strategy):
    model = create_model(str(tiny_hf_vit), num_classes=3, pretrained=False)
    strat = get_strategy(strategy)
    hp = strat.resolve(TrainConfig(data="x", strategy=strategy, lr=1e-3, lr_min=1e-6))
    lrs = sorted({g["lr"] for g in strat.param_groups(model, hp)})
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == 1e-3
    hp = strat.resolve(TrainConfig(data="x", strategy=strategy, lr=1e-3, layer_decay=0.5))
    lrs = sorted({g["lr"] for g in strat.param_groups(model, hp)}, reverse=True)
    assert lrs[:2] == pytest.approx([1e-3, 5e-4])
    with pytest.raises(AffinageError, match="lr_min"):
        strat.resolve(TrainConfig(data="x", strategy=strategy, lr=1e-4, lr_min=1e-3))


# ----------------------------------------------------------------------------------------------
# auto
# ----------------------------------------------------------------------------------------------
def _clusters(n_classes: int, per_class: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, 64))
    x = np.concatenate([c + spread * rng.normal(size=(per_class, 64)) for c in centres])
    return torch.tensor(x, dtype=torch.float32), np.repeat(np.arange(n_classes), per_class)


def test_evidence_orders_the_trial_near_domain_top_blocks_first():
    x, y = _clusters(3, 30, 0.1)
    sure = (torch.cat([torch.eye(64)[:3] * 50, torch.zeros(97, 64)]), torch.zeros(100))  # confident classifier
    evidence = domain_evidence(x, y, sure)
    order, why = trial_order(evidence)
    assert evidence["near_domain"] and evidence["images_per_class"] == 30
    assert order[:3] == ["linear-probe", "head", "partial:2"] and "scratch" not in order and "near" in why


def test_evidence_orders_the_trial_far_domain_deep_first_and_scratch_checked():
    x, y = _clusters(4, 120, 3.0)  # frozen features barely separate the classes
    unsure = (torch.zeros(100, 64), torch.zeros(100))  # uniform over its own classes
    evidence = domain_evidence(x, y, unsure)
    assert not evidence["near_domain"] and evidence["pretrained_entropy"] == pytest.approx(1.0)
    order, _ = trial_order(evidence)
    assert order[2] == "full" and order[-1] == "scratch"
    x, y = _clusters(4, 20, 3.0)
    assert trial_order(domain_evidence(x, y, unsure))[0][2] == "progressive"  # little data: unfreeze gradually


def test_auto_run_records_the_resolved_strategy_and_reason(tmp_path, tiny_timm, tiny_images, capsys):
    code = main(["train", "--data", str(tiny_images), "--model", str(tiny_timm), "--strategy", "auto",
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--quiet"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["strategy"] in ("linear-probe", "head", "partial:2", "progressive", "full", "lora", "scratch")
    assert metrics["strategy_reason"].startswith(f"auto chose {metrics['strategy']}:")
    assert "5-NN" in metrics["strategy_reason"] and metrics["strategy_evidence"]["classes"] == len(CLASSES)
    assert metrics["strategy_reason"] in capsys.readouterr().out
    assert Run.load(tmp_path / "run").strategy == metrics["strategy"]


def test_progressive_defaults_count_optimizer_steps_not_epochs():
    prog = get_strategy("progressive")
    cfg = TrainConfig(data="x", strategy="progressive")
    assert prog.resolve(cfg, 680)["epochs"] == 12  # 22 steps per epoch -> 250 steps
    assert prog.resolve(cfg, 4000)["epochs"] == 4  # large sets: at least the minimum
    assert prog.resolve(cfg, 40)["epochs"] == 15  # tiny sets: capped
    assert prog.resolve(cfg)["epochs"] == 4  # size unknown
    assert prog.resolve(cfg.replace(epochs=2), 680)["epochs"] == 2  # the user's value wins
    assert prog.resolve(cfg.replace(batch_size=64), 680)["epochs"] == 15
    assert prog.resolve(cfg, 680)["augment"] == "strong"
    assert prog.resolve(cfg.replace(augment="none"), 680)["augment"] == "none"
    for name, epochs in (("full", 3), ("partial:2", 4)):  # epoch-based, light augmentation
        assert get_strategy(name).resolve(cfg, 680)["epochs"] == epochs
        assert get_strategy(name).resolve(cfg, 680)["augment"] == "light"
