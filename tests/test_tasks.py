"""Several labels per image: one backbone, one head per --task, unknown labels masked out of loss and metrics."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from affinage.data import Sample, load_source
from affinage.errors import AffinageError
from affinage.labels import LabelSpace
from affinage.tasks import UNKNOWN, MultiHead, TaskObjective, TaskSet, build_tasks

TASKS = ["shape", "warmth", "tone"]


def _multi_csv(root: Path, images: Path, empty_every: int = 10, empty_first: bool = False) -> Path:
    """shape = the class folder; warmth = red vs the rest; tone: a third task whose cell is empty for 3 images
    of every 10 (30%)."""
    rows = []
    for cls in sorted(p.name for p in images.iterdir()):
        for i, f in enumerate(sorted((images / cls).iterdir())):
            tone = "" if i % empty_every < 3 else {"red_disc": "R", "green_square": "G"}.get(cls, "B")
            rows.append([str(f), "" if empty_first and i == 0 else cls, "warm" if cls == "red_disc" else "cold", tone,
                         "even" if i % 2 == 0 else "odd"])
    path = root / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", *TASKS, "group"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path, tiny_timm: Path) -> Path:
    from affinage.run import finetune

    root = tmp_path_factory.mktemp("multi")
    out = root / "run"
    finetune(data=str(_multi_csv(root, tiny_images)), model=str(tiny_timm), strategy="partial:1", out=out,
             progress=False, log=lambda _: None, tasks=TASKS, epochs=2,
             targets=["tone:accuracy>=0.0", "tone:recall[R]>=0.0", "warmth:accuracy>=0.99"])
    return out


def _taskset() -> TaskSet:
    spaces = (LabelSpace("a", ("x", "y"), "t", ), LabelSpace("b", ("p", "q", "r"), "t"))
    y = np.array([[0, 2], [1, UNKNOWN], [1, 0], [0, UNKNOWN]])
    return TaskSet(spaces, y)


def test_a_masked_label_contributes_zero_loss_and_zero_gradient() -> None:
    tasks = _taskset()
    objective = TaskObjective(tasks, label_smoothing=0.1)
    logits = torch.randn(4, 5, requires_grad=True)
    y = torch.as_tensor(tasks.y)
    loss = objective.loss(logits, y)
    loss.backward()
    masked_rows = (y[:, 1] == UNKNOWN).nonzero().flatten()
    assert torch.all(logits.grad[masked_rows, 2:] == 0)  # task b's logits of the images whose b label is unknown
    assert torch.all(logits.grad[masked_rows, :2] != 0)  # ... still train task a
    changed = logits.detach().clone()
    changed[masked_rows, 2:] += torch.randn(len(masked_rows), 3) * 100
    assert torch.isclose(objective.loss(changed, y), loss.detach())
    known = y[:, 1] != UNKNOWN
    expected = (torch.nn.functional.cross_entropy(logits[:, :2], y[:, 0], label_smoothing=0.1)
                + torch.nn.functional.cross_entropy(logits[known][:, 2:], y[known, 1], label_smoothing=0.1))
    assert torch.isclose(loss, expected)


def test_a_task_with_no_known_label_in_a_batch_adds_nothing() -> None:
    tasks = TaskSet(_taskset().spaces, np.array([[0, UNKNOWN], [1, UNKNOWN]]))
    logits = torch.randn(2, 5, requires_grad=True)
    loss = TaskObjective(tasks).loss(logits, torch.as_tensor(tasks.y))
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits[:, :2], torch.tensor([0, 1])))


def test_uncertainty_weighting_learns_one_weight_per_task() -> None:
    tasks = TaskSet(_taskset().spaces, _taskset().y, weighting="uncertainty")
    head = MultiHead({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 3)}, uncertainty=True)
    objective = TaskObjective(tasks).bind(head)
    with torch.no_grad():
        head.log_vars.copy_(torch.tensor([0.5, -0.3]))
    feats, y = torch.randn(4, 3), torch.as_tensor(tasks.y)
    logits = head(feats)
    plain = TaskObjective(TaskSet(tasks.spaces, tasks.y)).task_losses(logits, y, 0.0)
    weighted = objective.loss(logits, y)
    expected = sum(torch.exp(-head.log_vars[j]) * plain[j] + head.log_vars[j] for j in range(2))
    assert torch.isclose(weighted, expected)
    weighted.backward()
    assert head.log_vars.grad is not None and torch.all(head.log_vars.grad != 0)


def test_build_tasks_masks_empty_cells_and_classes_absent_from_train() -> None:
    samples = [Sample(f"s{i}", "a" if i % 2 else "b", more=(v,)) for i, v in
               enumerate(["x", "y", "", "x", "y", "rare", "x", "y"])]
    first = LabelSpace.from_labels([s.label for s in samples], "t", task="one")
    train = [0, 1, 2, 3, 4, 6]  # "rare" (sample 5) is not in train
    tasks = build_tasks(["one", "two"], samples, train, first, None, "equal")
    assert tasks.spaces[1].classes == ("x", "y")
    assert tasks.y[2, 1] == UNKNOWN and tasks.y[5, 1] == UNKNOWN
    assert tasks.masked["two"] == {"empty cell": 1, "class absent from the train split": 1}
    assert (tasks.y[:, 0] != UNKNOWN).all()
    with_rare = build_tasks(["one", "two"], samples, train + [5], first, 2, "equal")  # "rare" has 1 image < 2
    assert with_rare.y[5, 1] == UNKNOWN and "rare" not in with_rare.spaces[1].classes
    assert with_rare.masked["two"]["class with fewer than 2 images (--min-per-class)"] == 1
    assert with_rare.masked_classes["two"] == {"class with fewer than 2 images (--min-per-class)": {"rare": 1}}
    assert "'rare' (1)" in " ".join(with_rare.describe_masked())  # the run names the class it masked
    with pytest.raises(AffinageError, match="at least two classes"):
        build_tasks(["one", "two"], samples, train, first, 4, "equal")  # x and y have 3 images each, < 4


def test_a_declared_unknown_value_is_masked_and_named() -> None:
    samples = [Sample(f"s{i}", "a" if i % 2 else "b", more=(v,)) for i, v in
               enumerate(["x", "y", "NA", "x", "y", "z", "x", "y", "z", "NA"])]
    first = LabelSpace.from_labels([s.label for s in samples], "t", task="one")
    kept = build_tasks(["one", "two"], samples, range(10), first, None, "equal")
    assert "NA" in kept.spaces[1].classes  # by default a cell reading NA is a class: the run warns (run._tasks)
    tasks = build_tasks(["one", "two"], samples, range(10), first, None, "equal", unknown_values=["NA"])
    assert "NA" not in tasks.spaces[1].classes and tasks.y[2, 1] == UNKNOWN and tasks.y[9, 1] == UNKNOWN
    assert tasks.masked["two"] == {"--unknown-value": 2}
    assert "'NA' (2)" in " ".join(tasks.describe_masked())


def test_csv_task_columns_are_read_and_refused_clearly(tmp_path: Path, tiny_images: Path) -> None:
    path = _multi_csv(tmp_path, tiny_images)
    images = load_source(str(path), tasks=TASKS)
    assert images.tasks == tuple(TASKS)
    assert {s.more[1] for s in images.samples} == {"", "R", "G", "B"}
    with pytest.raises(AffinageError, match="needs colour"):
        load_source(str(path), tasks=["shape", "colour"])
    with pytest.raises(AffinageError, match="first --task"):
        load_source(str(_multi_csv(tmp_path, tiny_images, empty_first=True)), tasks=TASKS)
    with pytest.raises(AffinageError, match="needs a CSV"):
        load_source(str(tiny_images), tasks=["shape", "warmth"])


def test_multitask_run_reports_every_task_and_masks_unknown_labels(multi_run: Path) -> None:
    metrics = json.loads((multi_run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == set(TASKS)
    assert metrics["test"] == {k: v for k, v in metrics["tasks"]["shape"].items()
                               if k not in ("unknown", "classes", "masked", "masked_classes", "groups")}
    tone = metrics["tasks"]["tone"]
    test_rows = list(csv.DictReader(open(multi_run / "splits" / "test.csv")))
    empty = sum(1 for r in test_rows if int(Path(r["path"]).stem.split("_")[-1]) % 10 < 3)
    assert tone["unknown"] == empty and tone["n"] == len(test_rows) - empty
    assert metrics["tasks"]["shape"]["n"] == len(test_rows)  # images without a tone label still count for shape
    assert sorted(tone["classes"]) == ["B", "G", "R"] and "" not in tone["classes"]
    assert metrics["tasks"]["shape"]["accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert metrics["targets"][0]["expr"] == "tone:accuracy>=0.0" and metrics["targets"][0]["value"] == tone["accuracy"]
    assert metrics["targets"][1]["ci95"] == tone["ci95"]["recall[R]"]  # each task's figures carry their intervals
    warmth = metrics["tasks"]["warmth"]
    assert metrics["targets"][2]["value"] == warmth["accuracy"] and metrics["targets"][2]["ci95"] == warmth["ci95"]["accuracy"]
    assert (multi_run / "test_predictions-tone.csv").is_file()
    for task in TASKS:  # per-group figures per task, over that task's known labels
        by_group = metrics["tasks"][task]["groups"]["by_group"]
        assert sum(g["n"] for g in by_group.values()) == metrics["tasks"][task]["n"]
    info = json.loads((multi_run / "model" / "model.json").read_text())
    assert list(info["heads"]) == TASKS


def test_multitask_run_reloads_predicts_every_task_and_evaluates_identically(multi_run: Path, tiny_images: Path) -> None:
    from affinage.run import Run, evaluate_run

    run = Run.load(multi_run)
    assert [t.task for t in run.tasks] == TASKS
    photo = str(next((tiny_images / "red_disc").iterdir()))
    result = run.predict([photo])[0]
    assert set(result["tasks"]) == set(TASKS)
    assert result["label"] == result["tasks"]["shape"]["label"]
    for task, answer in result["tasks"].items():
        space = next(t for t in run.tasks if t.task == task)
        assert answer["label"] in space.classes
        assert abs(sum(t["probability"] for t in answer["top_k"]) - 1) < 1e-5
    again = evaluate_run(multi_run, progress=False)
    assert again["accuracy"] == run.metrics["test"]["accuracy"] and again["loss"] == run.metrics["test"]["loss"]


def test_multitask_onnx_export_has_one_output_per_task(multi_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from affinage.export import export_run

    report = export_run(multi_run, "onnx", tmp_path / "onnx", log=lambda _: None)
    assert set(report["tasks_checked"]) == set(TASKS)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "logits_warmth", "logits_tone"]
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert [t["num_labels"] for t in config["tasks"]] == [3, 2, 3]


def test_targets_name_their_task() -> None:
    from affinage.targets import check_targets, parse_targets

    tasks = {"gender": ["Men", "Women"], "colour": ["Blue", "Red"]}
    targets = parse_targets(["gender:accuracy>=0.9", "colour:recall[Blue]>=0.8", "accuracy>=0.5"], ["Men", "Women"],
                            tasks)
    assert [t.task for t in targets] == ["gender", "colour", None]
    with pytest.raises(AffinageError, match="task 'season'"):
        parse_targets(["season:accuracy>=0.9"], ["Men", "Women"], tasks)
    with pytest.raises(AffinageError, match="class 'Green'"):
        parse_targets(["colour:recall[Green]>=0.8"], ["Men", "Women"], tasks)
    blocks = {"gender": {"accuracy": 0.95}, "colour": {"per_class": {"Blue": {"recall": 0.7}}}}
    results = check_targets(targets, {"accuracy": 0.6}, blocks)
    assert [r["passed"] for r in results] == [True, False, True]


def test_the_demo_page_shows_one_label_per_task(multi_run: Path, tiny_images: Path) -> None:
    pytest.importorskip("gradio")
    from affinage.serve import build_app

    app = build_app(multi_run)
    try:
        predict = next(fn.fn for fn in app.fns.values() if fn.api_name == "predict")
        photo = str(next((tiny_images / "red_disc").iterdir()))
        answers = predict({"path": photo, "orig_name": "red.png"})
        assert len(answers) == len(TASKS)
        assert set(answers[1]) == {"cold", "warm"} and abs(sum(answers[1].values()) - 1) < 1e-5
        assert predict(None) == [None] * len(TASKS)
    finally:
        app._affinage_model.close()


def test_compare_shows_the_first_tasks_val_and_the_per_task_difference(multi_run: Path, tmp_path: Path) -> None:
    """compare chooses on the first task's val predictions: its row shows that task's val accuracy (not metrics'
    every-task figure); multitask_table gives each task's difference to its single-task run and LibMTL's Delta_m."""
    from affinage.compare import finish, multitask_table, row_from_run

    row = row_from_run("partial:1", multi_run, 10.0)
    finish(tmp_path, [row], [], log=lambda _: None)
    val = list(csv.DictReader(open(multi_run / "val_predictions.csv", encoding="utf-8")))
    first = sum(r["label"] == r["predicted"] for r in val) / len(val)
    assert row["val_accuracy"] == pytest.approx(first)
    metrics = json.loads((multi_run / "metrics.json").read_text())
    assert metrics["val"]["n"] > len(val)  # metrics' val counts every task's known labels
    solo = dict(row, wall_seconds=4.0, energy_kwh=1e-4)  # the same run stands in for each task trained alone
    table = multitask_table(tmp_path, [row], {("partial:1", t): solo for t in TASKS}, list(TASKS), log=lambda _: None)
    per_task = [t for t in table if t["task"] in TASKS]
    assert [t["task"] for t in per_task] == list(TASKS) and all(t["difference"] == 0 for t in per_task)
    summary = table[-1]
    assert summary["relative_difference"] == 0 and summary["alone_wall_seconds"] == 4.0 * len(TASKS)
    assert "Delta_m" in (tmp_path / "compare.md").read_text() and (tmp_path / "multitask.csv").exists()
