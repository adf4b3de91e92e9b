"""Keeping the old task (--init-from, --old-data, --keep): old head rows, replay batches, distillation, forgetting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from affinage.backbones import start_from_run
from affinage.config import TrainConfig
from affinage.errors import AffinageError
from affinage.keep import DistillLoss, OldTask, ReplayBatchSampler, aliases, distill_term, imprint, union_labels
from affinage.labels import LabelSpace
from affinage.predict import expand_inputs, predict_files
from affinage.run import finetune
from affinage.search import new_head

NEW = ("bright", "dark")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """Two new classes that look like none of the old ones: dark and bright grey noise."""
    root = tmp_path_factory.mktemp("new") / "greys"
    rng = np.random.default_rng(1)
    for name, level in zip(NEW, (215, 40)):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 20, (44, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
    return root


def _old(net) -> OldTask:
    start = net.pretrained_head
    return OldTask("run", LabelSpace("label", start.labels.classes, "old"), start.layer, start.hidden, "replay", None)


def test_old_head_rows_are_kept_bit_for_bit_and_new_rows_added(tiny_run):
    net = start_from_run(Path(tiny_run))
    old = _old(net)
    labels = union_labels(old, list(NEW) + [old.labels.classes[0]], "new")  # an old name is that old class
    assert labels.classes == old.labels.classes + NEW
    head = new_head(TrainConfig(data="x"), net.num_features, labels, None, net)
    assert head.out_features == len(old.labels) + 2
    w, b = net.pretrained_head.layer.weight, net.pretrained_head.layer.bias
    assert torch.equal(head.weight[:len(old.labels)], w) and torch.equal(head.bias[:len(old.labels)], b)
    assert not torch.equal(head.weight[len(old.labels):], torch.zeros_like(head.weight[len(old.labels):]))
    # imprinting moves the new rows only, to the old rows' scale
    feats = torch.randn(10, net.num_features)
    y = np.array([3] * 5 + [4] * 5)
    imprint(head, feats, y, len(old.labels))
    assert torch.equal(head.weight[:len(old.labels)], w)
    assert float(head.weight[3].detach().norm()) == pytest.approx(float(w.detach().norm(dim=1).median()), rel=1e-5)


def test_replay_batches_hold_the_requested_share_of_old_images():
    new, old = list(range(40)), list(range(40, 50))
    for fraction, batch in ((0.5, 8), (0.25, 8), (0.5, 7)):
        g = torch.Generator().manual_seed(0)
        sampler = ReplayBatchSampler(new, old, batch, fraction, g)
        batches = list(sampler)
        n_old = round(batch * fraction)
        assert len(batches) == len(sampler)
        assert all(sum(i >= 40 for i in b) == n_old for b in batches[:-1])  # every full batch: exactly the share
        seen = [i for b in batches for i in b if i < 40]
        assert sorted(seen) == new  # each new image once per epoch
        assert {i for b in batches for i in b if i >= 40} == set(old)  # the old images cycled through
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert list(ReplayBatchSampler(new, old, 8, 0.5, g1)) == list(ReplayBatchSampler(new, old, 8, 0.5, g2))


def test_distillation_loss_is_zero_when_the_model_equals_the_teacher():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(6, 3)
    x = torch.randn(5, 6)
    with torch.no_grad():
        same = torch.cat([teacher(x), torch.randn(5, 2)], dim=1)  # old-class logits equal, new columns anything
    assert float(distill_term(same, teacher(x).detach(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    moved = same.clone()
    moved[:, 0] += 3.0
    assert float(distill_term(moved, teacher(x).detach(), 2.0)) > 0.05
    y = torch.tensor([0, 1, 2, 3, 4])
    loss = DistillLoss(teacher, 2.0, 1.0, 0.0)
    ce = torch.nn.functional.cross_entropy(same, y)
    assert float(loss(same, y, x)) == pytest.approx(float(ce), abs=1e-5)  # only the labels' loss is left
    assert float(loss(moved, y, x)) > float(torch.nn.functional.cross_entropy(moved, y)) + 0.05


@pytest.mark.parametrize("keep", ["none", "replay", "distill", "replay+distill"])
def test_every_keep_mode_extends_the_label_space_and_measures_forgetting(tmp_path, tiny_run, tiny_images,
                                                                          new_images, keep):
    run = finetune(data=str(new_images), strategy="partial:1", out=tmp_path / "run", progress=False, log=_quiet,
                   init_from=str(tiny_run), old_data=str(tiny_images), keep=keep, epochs=2, batch_size=8)
    old_classes = tuple(start_from_run(Path(tiny_run)).pretrained_head.labels.classes)
    assert tuple(run.classes) == old_classes + NEW
    old, new = run.metrics["old_task"], run.metrics["new_task"]
    assert old["measured"] and old["keep"] == keep and old["n"] > 0 and new["n"] > 0
    assert old["forgetting"] == pytest.approx(old["accuracy_before"] - old["accuracy_after"])
    assert old["accuracy_before"] >= 0.9  # the tiny run separates its 3 classes
    assert (old["old_images_trained_on"] > 0) == ("replay" in keep)  # old train images train only when replayed
    assert run.metrics["test"]["n"] == old["n"] + new["n"]  # test: the union of both test splits
    assert (run.path / "splits" / "train.csv").read_text().count("red_disc") > 0  # the old data's splits are saved
    html = (run.path / "report.html").read_text()
    assert "Old task: forgetting" in html


def test_replay_keeps_the_old_task_where_plain_fine_tuning_forgets(tmp_path, tiny_run, tiny_images, new_images):
    figures = {}
    for keep in ("none", "replay"):
        run = finetune(data=str(new_images), strategy="partial:2", out=tmp_path / keep, progress=False, log=_quiet,
                       init_from=str(tiny_run), old_data=str(tiny_images), keep=keep, epochs=3, batch_size=8,
                       interpolate="none", lr=3e-3)
        figures[keep] = run.metrics["old_task"]["forgetting"]
    # (val, with both tasks weighted equally, already shields `none` by keeping an early epoch: replay must do
    # at least as well and keep the old task within a point)
    assert figures["replay"] <= 0.01 and figures["replay"] <= figures["none"]


def test_without_old_data_forgetting_is_said_not_measured(tmp_path, tiny_run, new_images):
    lines: list[str] = []
    run = finetune(data=str(new_images), strategy="linear-probe", out=tmp_path / "run", progress=False,
                   log=lines.append, init_from=str(tiny_run))
    old = run.metrics["old_task"]
    assert old["keep"] == "distill" and old["measured"] is False and "accuracy_before" not in old
    assert any("not measured" in line for line in lines)
    assert "Forgetting not measured" in (run.path / "report.html").read_text()
    # predict answers with old and new class names
    files, _ = expand_inputs([str(new_images)])
    labels = {r["label"] for r in predict_files(run, files[:6], top_k=len(run.classes))}
    assert labels <= set(run.classes) and len(run.classes) == 5
    assert set(predict_files(run, files[:1], top_k=5)[0]["top_k"][k]["label"] for k in range(5)) == set(run.classes)
    # the ONNX export holds the union label space and agrees with the run's model; its card names the old classes
    import json

    from affinage.export import export_run

    report = export_run(run.path, "onnx", tmp_path / "onnx", log=_quiet)
    assert report["top1_agree"] == report["inputs"] and report["max_abs_diff"] < 1e-3
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(5)] == list(run.classes)
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert "## Old and new classes" in card and "not measured" in card


def test_old_data_labels_may_use_the_short_name_or_the_wordnet_id():
    space = LabelSpace("label", ("ant, emmet, pismire", "bee", "crane", "crane_2"), "imagenet-like")
    names = aliases(space)
    assert names["ant"] == "ant, emmet, pismire" and names["ant, emmet, pismire"] == "ant, emmet, pismire"
    assert names["bee"] == "bee" and names["crane"] == "crane"


def test_unknown_old_data_labels_and_missing_options_are_refused(tmp_path, tiny_run, new_images):
    with pytest.raises(AffinageError, match="needs --init-from"):
        TrainConfig(data="x", old_data="y")
    with pytest.raises(AffinageError, match="no --old-data"):
        TrainConfig(data="x", init_from="pretrained", keep="replay")
    with pytest.raises(AffinageError, match="not a class of"):  # the new images' labels are not old classes
        finetune(data=str(new_images), strategy="linear-probe", out=tmp_path / "run", progress=False, log=_quiet,
                 init_from=str(tiny_run), old_data=str(new_images))
    assert not (tmp_path / "run").exists()  # refused before any run directory


def test_init_from_the_checkpoints_own_classifier_with_imagenet_names(tmp_path, tiny_timm, tiny_images, new_images):
    """--init-from pretrained: the 1000 ImageNet classes first, then the new ones; old data labelled by the short
    name ('ant') or the WordNet id (n02206856: 'bee')."""
    files = sorted(p for p in Path(tiny_images).rglob("*") if p.suffix in (".png", ".jpg"))
    rows = ["path,label"] + [f"{p},{'ant' if 'red' in p.name else 'n02206856'}" for p in files
                             if "red" in p.name or "green" in p.name]
    csv = tmp_path / "old.csv"
    csv.write_text("\n".join(rows) + "\n")
    run = finetune(data=str(new_images), model=str(tiny_timm), strategy="linear-probe", out=tmp_path / "run",
                   progress=False, log=_quiet, init_from="pretrained", old_data=str(csv))
    assert len(run.classes) == 1002 and tuple(run.classes[-2:]) == NEW
    assert run.classes[310] == "ant, emmet, pismire" and run.classes[309] == "bee"
    old = run.metrics["old_task"]
    assert old["measured"] and old["keep"] == "replay" and set(old["per_class"]) == {"ant, emmet, pismire", "bee"}


def test_compare_ranks_the_ways_of_keeping_the_old_task(tmp_path, tiny_run, tiny_images, new_images):
    from affinage.compare import compare

    result = compare(data=str(new_images), model="efficientnet_lite0", strategies=["linear-probe"],
                     out=tmp_path / "cmp", progress=False, log=_quiet, keeps=["none", "replay"],
                     train_args=["--init-from", str(tiny_run), "--old-data", str(tiny_images)])
    rows = {r["strategy"]: r for r in result.rows}
    assert set(rows) == {"linear-probe keep=none", "linear-probe keep=replay"}
    for mode in ("none", "replay"):
        r = rows[f"linear-probe keep={mode}"]
        assert r["keep"] == mode and r["forgetting"] is not None and r["new_accuracy"] is not None
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "forgetting" in md and "keep=replay" in md


def test_val_accuracy_while_keeping_is_the_mean_of_both_tasks():
    from affinage.keep import val_weights

    old = OldTask("run", LabelSpace("label", ("a",), "old"), torch.nn.Identity(), None, "replay", "x")
    is_old = np.array([True] * 30 + [False] * 10)
    w = val_weights(old, list(range(40)), is_old)
    assert float(w.sum()) == pytest.approx(1.0)
    correct = np.array([1.0] * 30 + [0.0] * 10)  # every old image right, every new one wrong
    assert float((w.numpy() * correct).sum()) == pytest.approx(0.5)  # not 0.75: both tasks count equally
    assert val_weights(old, list(range(30)), is_old) is None  # one task only in val: the plain accuracy


def test_new_class_offset_undoes_a_recency_bias_chosen_on_val():
    from affinage.keep import add_new_class_offset, new_class_offset

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20 + [2, 3] * 20)
    is_old = y < 2
    logits = rng.normal(0, 0.3, (80, 4))
    logits[np.arange(80), y] += 2.0
    logits[:, 2:] += 3.0  # every image pushed to the new classes: the old ones are always wrong
    assert (logits[is_old].argmax(1) == y[is_old]).mean() == 0.0
    delta, curve = new_class_offset(logits, y, is_old, 2)
    assert -6 <= delta <= -1.5 and len(curve) > 10
    head = torch.nn.Linear(3, 4)
    before = head.bias.detach().clone()
    add_new_class_offset(head, 2, delta)
    assert torch.equal(head.bias[:2], before[:2]) and torch.allclose(head.bias[2:], before[2:] + delta)
