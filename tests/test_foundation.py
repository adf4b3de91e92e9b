"""The foundation: stages usable alone, label spaces and heads, one owner of the run directory (format versions),
a finished run as the start of another, per-stage random streams, and the shape of the package (no import cycle,
no overlong function)."""
from __future__ import annotations

import ast
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from affinage import runfiles
from affinage.errors import AffinageError
from affinage.labels import LabelSpace
from affinage.run import Run, finetune

SRC = Path(__file__).resolve().parents[1] / "src" / "affinage"
quiet = {"progress": False, "log": lambda _: None}


# ----------------------------------------------------------------------------------------------
# Package shape
# ----------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """affinage modules imported by `path` at any level (functions too), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("affinage."):
            found.add(node.module.split(".")[1])
    return found - {path.stem}


def test_no_import_cycle_between_modules():
    graph = {p.stem: _imports(p) & {q.stem for q in SRC.glob("*.py")} for p in SRC.glob("*.py") if p.stem != "__init__"}
    graph = {k: v - {"__init__"} for k, v in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1 and not cycle:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"
    assert "run" not in graph["predict"] and "train" not in graph["saved"] and "strategies" not in graph["saved"]


def test_no_function_over_80_lines_without_a_reason():
    long = []
    for path in SRC.glob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                around = "\n".join(lines[max(0, node.lineno - 3):node.lineno + 2])
                if "long-function:" not in around:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 80 lines without a `# long-function: <reason>` comment: " + ", ".join(long)


def test_finetune_reads_as_the_stage_list():
    source = (SRC / "run.py").read_text(encoding="utf-8")
    body = ast.get_source_segment(source, next(n for n in ast.parse(source).body
                                               if isinstance(n, ast.FunctionDef) and n.name == "finetune"))
    order = ["load_data(", "choose_backbone(", "build_backbone(", "open_run_dir(", "prepare_data(", "extract_features(",
             "plan_training(", "train_model(", "evaluate_model(", "write_run("]
    positions = [body.index(stage) for stage in order]
    assert positions == sorted(positions)
    assert len(body.splitlines()) < 45


# ----------------------------------------------------------------------------------------------
# Label spaces
# ----------------------------------------------------------------------------------------------
def test_label_space_order_extend_and_round_trip():
    space = LabelSpace.from_labels(["b", "a", "c", "a"], "test")
    assert space.classes == ("a", "b", "c") and space.index("c") == 2
    grown = space.extend(["d", "a"], "more")
    assert grown.classes == ("a", "b", "c", "d") and [grown.index(c) for c in space.classes] == [0, 1, 2]
    assert LabelSpace.from_dict(json.loads(json.dumps(grown.to_dict()))) == grown
    with pytest.raises(AffinageError, match="'z' is not in the label space"):
        space.index("z")
    with pytest.raises(AffinageError, match="appears twice"):
        LabelSpace("label", ("a", "a"), "x")


def test_builtin_checkpoint_classifier_is_a_head_with_imagenet_names():
    from affinage.backbones import create_model

    model = create_model("efficientnet_lite0", num_classes=3)
    head = model.pretrained_head
    assert head is not None and len(head.labels) == 1000
    assert head.labels.classes[0].startswith("tench") and "ImageNetInfo" in head.labels.source
    assert not any(k.startswith("pretrained") for k in model.state_dict())  # never saved, never trained
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert head.layer(model.forward_features(x)).shape == (1, 1000)


def test_heads_by_task_and_label_space_saved_in_model_files(tiny_run: Path):
    info = runfiles.read_model_info(tiny_run)
    assert info.format_version == runfiles.FORMAT_VERSION and info.task == "label"
    assert info.labels.classes == ("blue_bar", "green_square", "red_disc") and "train split" in info.labels.source
    run = Run.load(tiny_run)
    assert set(run.model.heads) == {"label"} and run.model.label_spaces["label"] == info.labels
    assert all(k.startswith(("backbone.", "heads.label.")) for k in run.model.state_dict())


# ----------------------------------------------------------------------------------------------
# Run files
# ----------------------------------------------------------------------------------------------
def test_metrics_have_a_version_and_every_required_key(tiny_run: Path):
    metrics = runfiles.read_metrics(tiny_run, required=True)
    required = [k.rstrip("*") for k in runfiles.METRICS_SCHEMA if k.endswith("*")]
    assert metrics["format_version"] == 2
    assert [k for k in required if k not in metrics] == []


def test_test_predictions_carry_the_full_probability_vector_keyed_by_hash(tiny_run: Path):
    preds = runfiles.read_predictions(tiny_run)
    split = list(csv.DictReader(open(tiny_run / "splits" / "test.csv", encoding="utf-8")))
    assert preds is not None and preds.classes == list(runfiles.read_model_info(tiny_run).classes)
    assert preds.probabilities.shape == (len(split), 3)
    np.testing.assert_allclose(preds.probabilities.sum(1), 1.0, atol=1e-4)
    assert preds.hashes == [row["sha"] for row in split]
    top = [preds.classes[j] for j in preds.probabilities.argmax(1)]
    assert top == preds.predicted


def test_a_format_1_run_directory_still_loads_and_predicts_the_same(tiny_run: Path, tmp_path: Path, tiny_images: Path):
    """Runs written before format_version existed: one `head.*`, `classes` and `head_hidden` in model.json."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    info = json.loads((old / "model" / "model.json").read_text())
    v1 = {"classes": info["classes"], "id2label": info["id2label"], "backbone": info["backbone"], "head_hidden": None,
          "preprocessing": info["preprocessing"], "inference": info["inference"], "strategy": info["strategy"]}
    (old / "model" / "model.json").write_text(json.dumps(v1))
    state = load_file(str(old / "model" / "model.safetensors"))
    save_file({k.replace("heads.label.", "head."): v for k, v in state.items()}, str(old / "model" / "model.safetensors"))
    metrics = json.loads((old / "metrics.json").read_text())
    metrics.pop("format_version")
    (old / "metrics.json").write_text(json.dumps(metrics))

    loaded, current = Run.load(old), Run.load(tiny_run)
    assert loaded.info.format_version == 1 and loaded.info.evaluated_on == "features"
    files = sorted(str(p) for p in tiny_images.rglob("*.png"))[:4]
    assert [r["label"] for r in loaded.predict(files)] == [r["label"] for r in current.predict(files)]
    assert [r["probability"] for r in loaded.predict(files)] == pytest.approx([r["probability"] for r in current.predict(files)])


def test_damaged_or_newer_model_files_give_one_clear_line(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "model" / "model.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(AffinageError, match="newer affinage"):
        Run.load(run)
    path.write_text(json.dumps({k: v for k, v in info.items() if k != "heads"}))
    with pytest.raises(AffinageError, match="missing the field 'heads'"):
        Run.load(run)


# ----------------------------------------------------------------------------------------------
# Stages alone, seeds, a run as the start of another
# ----------------------------------------------------------------------------------------------
def test_stages_run_alone_from_python(tiny_images: Path, tiny_timm: Path, tmp_path: Path):
    from affinage import run as pipeline
    from affinage.config import TrainConfig

    cfg = TrainConfig(data=str(tiny_images), model=str(tiny_timm), strategy="linear-probe")
    images = pipeline.load_data(cfg)
    backbone = pipeline.build_backbone(cfg)
    run_dir = pipeline.open_run_dir(cfg, tmp_path / "r")
    data = pipeline.prepare_data(cfg, images, backbone.preprocessing, run_dir, False, lambda _: None)
    assert data.labels.classes == ("blue_bar", "green_square", "red_disc")
    assert len(data.splits.train) + len(data.splits.val) + len(data.splits.test) == 36
    assert (run_dir / "splits" / "train.csv").is_file() and (run_dir / "config.yaml").is_file()
    plan = pipeline.plan_device(cfg)
    backbone, features = pipeline.extract_features(cfg, backbone, data, plan, False, lambda _: None)
    assert features.values.shape[0] == 36
    plan = pipeline.plan_training(cfg, backbone, data, features, plan, lambda _: None)
    assert plan.strategy.name == "linear-probe" and plan.hp["epochs"] > 0
    with pytest.raises(AffinageError, match="already exists"):
        pipeline.open_run_dir(cfg, run_dir)


def test_stage_seeds_are_independent_streams():
    from affinage.seeding import seeded, stage_seed

    assert stage_seed(0, "head") != stage_seed(0, "backbone") and stage_seed(0, "head") == stage_seed(0, "head")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(0, "head"):
        a = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)  # the global stream did not move
    with seeded(0, "head"):
        assert torch.equal(torch.rand(2), a)


def test_a_finished_run_is_the_starting_model_of_a_new_run(tiny_run: Path, tiny_images: Path, tmp_path: Path):
    from affinage.backbones import create_model

    start = create_model(str(tiny_run), num_classes=3)
    assert start.pretrained_head.labels == runfiles.read_model_info(tiny_run).labels
    old = Run.load(tiny_run)
    new = finetune(data=str(tiny_images), model=str(tiny_run), strategy="linear-probe", out=tmp_path / "next", **quiet)
    old_state, new_state = old.model.state_dict(), new.model.state_dict()
    backbone = [k for k in old_state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(old_state[k], new_state[k]) for k in backbone)  # frozen: the old backbone
    assert new.metrics["model"]["backbone"].startswith("run:")
    assert new.metrics["test"]["accuracy"] >= old.metrics["test"]["accuracy"] - 0.1
    assert new.classes == old.classes


# ----------------------------------------------------------------------------------------------
# Classes too small to split: refused by default, naming them; --min-per-class leaves them out, listed
# ----------------------------------------------------------------------------------------------
def _with_tiny_classes(root: Path, tiny_images: Path) -> Path:
    data = root / "data"
    shutil.copytree(tiny_images, data)
    for name, keep in (("rare_one", 1), ("rare_two", 2)):
        (data / name).mkdir()
        for src in sorted((tiny_images / "red_disc").glob("*.png"))[:keep]:
            shutil.copy(src, data / name / f"{name}_{src.name}")
    return data


def test_classes_too_small_to_split_are_refused_by_name(tmp_path: Path, tiny_images: Path, tiny_timm: Path):
    data = _with_tiny_classes(tmp_path, tiny_images)
    with pytest.raises(AffinageError) as err:
        finetune(data=str(data), model=str(tiny_timm), out=tmp_path / "r", **quiet)
    assert "'rare_one' (1), 'rare_two' (2)" in str(err.value) and "--min-per-class 3" in str(err.value)
    assert not (tmp_path / "r").exists()  # refused before any run directory is made


def test_min_per_class_leaves_small_classes_out_and_lists_them(tmp_path: Path, tiny_images: Path, tiny_timm: Path):
    data = _with_tiny_classes(tmp_path, tiny_images)
    run = finetune(data=str(data), model=str(tiny_timm), out=tmp_path / "r", min_per_class=3, **quiet)
    assert run.classes == ["blue_bar", "green_square", "red_disc"]
    assert run.metrics["data"]["classes_left_out"] == {"rare_one": 1, "rare_two": 2}
    skipped = list(csv.DictReader(open(run.path / "skipped_files.csv", encoding="utf-8")))
    rare = [r for r in skipped if "rare_" in r["path"]]
    assert len(rare) == 3 and all("fewer than --min-per-class 3" in r["reason"] for r in rare)
    with pytest.raises(AffinageError, match="min_per_class must be >= 1"):
        finetune(data=str(data), model=str(tiny_timm), out=tmp_path / "r2", min_per_class=0, **quiet)
