"""The `affinage` command: thin parsers over the Python API. Problems print one line, no traceback."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import AUGMENT_PRESETS, COMPARE_STRATEGIES, KEEP_MODES, PRECISIONS, REPORT_TO, RUNTIMES, STRATEGY_NAMES
from .errors import AffinageError

DEMO_DATA = "digits"
DEMO_MODEL = "efficientnet_lite0"
DEMO_STRATEGY = "auto"
DEMO_PRESET = {"strategy": "full", "image_size": 128, "train_image_size": 128, "epochs": 4, "augment": "light"}  # `affinage demo`: ~0.96 test accuracy, ~1.5 min on 2 CPU cores


# long-function: one declaration per `train` option, grouped as --help prints them
def _add_train_options(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of these options (TrainConfig's field names, "
                                                    "e.g. a run's own config.yaml); options given here override it")
    g.add_argument("--data", default=None if data_required else DEMO_DATA,  # required, unless --config gives it
                   help="a folder of class subfolders, a folder with train/val[/test] subfolders, a CSV "
                        "(path,label[,split][,group]), hf:<dataset id>[:config], or 'digits'")
    g.add_argument("--model", default=DEMO_MODEL,
                   help="backbone: efficientnet_lite0 / efficientnet_lite2 (built-in, offline), timm:<name>, "
                        "hf:<org/name>, or a local folder with config.json + weights (default: %(default)s)")
    g.add_argument("--strategy", default=DEMO_STRATEGY,
                   help=f"one of {', '.join(STRATEGY_NAMES)}; auto tries candidates within --budget and keeps the "
                        "best on val, saying why (default: %(default)s)")
    g.add_argument("--models", help="backbones to rank by a tuned frozen-feature probe on val, comma-separated; the "
                                    "best (the smaller where val cannot separate them) is trained; --model auto "
                                    "ranks the built-ins")
    g.add_argument("--budget", help="auto: wall-clock allowance of the whole run, e.g. 10m, 90s, 1h (default: 10m on "
                                    "a CPU, 30m on a GPU)")
    g.add_argument("--budget-factor", type=float, metavar="F",
                   help="auto: at most F times the linear probe's cost (decoding + features + probe)")
    g.add_argument("--candidates", help="auto: only these strategies, comma-separated (default: all, in auto's order)")
    g.add_argument("--out", default=None, help="new run directory (default: runs/<date-time>-<strategy>); "
                                               "an existing non-empty directory is refused")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint (same options required; "
                        "the result is identical to an uninterrupted run)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, init and data order (default: 0)")
    k = p.add_argument_group("keep what a model knew (add classes without forgetting the old ones)")
    k.add_argument("--init-from", metavar="RUN|pretrained",
                   help="start from a finished run's classifier (its backbone, head and classes) or the checkpoint's "
                        "own (pretrained: e.g. ImageNet's 1000 classes); classes = the old ones followed by the new")
    k.add_argument("--old-data", metavar="DATA",
                   help="labelled images of the old classes (any --data source): replayed while training, their test "
                        "split measures forgetting")
    k.add_argument("--keep", choices=KEEP_MODES,
                   help="how to keep the old task (default: replay with --old-data, else distill)")
    k.add_argument("--replay-fraction", type=float, default=0.5, metavar="F",
                   help="share of each batch drawn from --old-data (default: %(default)s)")
    k.add_argument("--distill-temperature", type=float, default=2.0, metavar="T",
                   help="Learning-without-Forgetting temperature (default: %(default)s)")
    k.add_argument("--distill-weight", type=float, default=1.0, metavar="W",
                   help="weight of the distillation loss next to the new task's (default: %(default)s)")
    h = p.add_argument_group("hyper-parameters (defaults depend on the strategy)")
    h.add_argument("--epochs", type=int, help="training epochs")
    h.add_argument("--lr", type=float, help="peak learning rate of the head; backbone blocks get less")
    h.add_argument("--batch-size", type=int, help="images per step (default: 32, 128 on cached features)")
    h.add_argument("--weight-decay", type=float, help="AdamW weight decay (never on biases/norms)")
    h.add_argument("--layer-decay", type=float, help="LR multiplier per block going down from the head, in (0, 1]")
    h.add_argument("--lr-min", type=float, help="discriminative LRs: the lowest trained block gets this LR, the blocks "
                                               "between are spread geometrically up to --lr (fastai's slice(lr_min, lr)); "
                                               "replaces --layer-decay")
    h.add_argument("--lora-rank", type=int, default=8, help="LoRA adapter rank (strategy lora; default: %(default)s)")
    h.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling alpha (default: %(default)s)")
    h.add_argument("--label-smoothing", type=float, default=0.1, help="default: %(default)s")
    h.add_argument("--augment", choices=AUGMENT_PRESETS,
                   help="augmentation preset (default: the strategy's: strong for progressive, light otherwise)")
    h.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warmup before cosine decay (default: 0.5)")
    h.add_argument("--patience", type=int, help="early stopping: stop after this many epochs in a row without val "
                                                "improvement, keeping the best weights (>= 1; 1 stops at the first "
                                                "epoch that does not improve; default: the strategy's)")
    h.add_argument("--head-init", choices=("probe", "random"), default="probe",
                   help="unfreezing strategies start from a head fitted on frozen features (probe, default) or random")
    h.add_argument("--interpolate", default="auto", metavar="auto|none|ALPHA",
                   help="WiSE-FT: mix the probe-initialised start and the fine-tuned weights; auto picks alpha among "
                        "0.5, 0.75, 1 on val (default: %(default)s)")
    h.add_argument("--tta", choices=("auto", "on", "off"), default="auto",
                   help="flip test-time augmentation; auto keeps it where it helps on val (default: %(default)s)")
    h.add_argument("--refit", choices=("auto", "on", "off"), default="auto",
                   help="refit the kept configuration on train+val (auto: the probe only, whose refit is cheap; on: "
                        "also strategies that train the backbone, a second training) (default: %(default)s)")
    h.add_argument("--train-bn-stats", action="store_true",
                   help="let BatchNorm re-estimate its statistics while fine-tuning (default: keep the pretrained ones)")
    h.add_argument("--image-size", type=int, help="override the checkpoint's input size (pixels); needed where its "
                                                  "preprocessor config states none")
    h.add_argument("--mean", type=_rgb, metavar="R,G,B", help="normalisation mean, replacing the checkpoint's; needed "
                                                            "where its preprocessor config states none")
    h.add_argument("--std", type=_rgb, metavar="R,G,B", help="normalisation std, likewise")
    h.add_argument("--train-image-size", type=int,
                   help="training crop size (default: 80%% of the eval size for convnets, equal for ViTs)")
    h.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    d = p.add_argument_group("data and hardware")
    d.add_argument("--val-fraction", type=float, default=0.15, help="carved from train when no val split is given")
    d.add_argument("--test-fraction", type=float, default=0.15, help="carved when no test split is given")
    d.add_argument("--splits-from", help="reuse the split lists of an earlier run directory")
    d.add_argument("--group-by", help="regex on the path whose first group names a sample's group (bias metrics)")
    d.add_argument("--task", action="append", default=[], metavar="COLUMN", dest="tasks",
                   help="a label column of the CSV to learn (repeatable: one backbone, one head per task; the first "
                        "is stratified on and reported as `test`; empty cells of the others are unknown, masked). "
                        "Default: the column `label`")
    d.add_argument("--train-task", action="append", default=[], metavar="COLUMN", dest="train_tasks",
                   help="several --task: only these tasks' losses train (repeatable; the others' heads are measured "
                        "only): a single-task baseline on the same images and splits")
    d.add_argument("--unknown-value", action="append", default=[], metavar="TEXT", dest="unknown_values",
                   help="several --task: a cell reading TEXT (e.g. NA) is unknown for that task, like an empty cell "
                        "(repeatable; the first task must still be known on every row)")
    d.add_argument("--task-weighting", choices=("equal", "uncertainty"), default="equal",
                   help="several --task: sum the task losses (equal, the default) or weigh them by learned "
                        "uncertainty (Kendall et al. 2018)")
    d.add_argument("--min-per-class", type=int, metavar="N",
                   help="leave out the classes with fewer than N usable images (listed in skipped_files.csv with the "
                        "reason); default: refuse data with classes too small to split, naming them")
    d.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16/fp16 on GPU; fp32 training and bf16 inference on CPUs with AVX512-BF16")
    d.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="frozen-backbone features: auto (measure torch and onnxruntime on a check batch of your "
                        "images, verify ONNX against fp32 torch, keep the faster; remembered per machine), torch, onnx")
    d.add_argument("--num-workers", type=int, help="DataLoader workers (default: 0 on CPU, up to 8 on GPU)")
    d.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")
    d.add_argument("--trust-remote-code", action="store_true", help="allow custom code from a Hub model repo")
    d.add_argument("--image-column", metavar="COLUMN", help="hf: data: the image column (default: the dataset's one "
                                                             "Image feature)")
    d.add_argument("--label-column", metavar="COLUMN", help="hf: data: the label column (default: its one ClassLabel "
                                                             "feature; a plain column's values are the class names)")
    d.add_argument("--report-to", action="append", default=[], choices=REPORT_TO, dest="report_to",
                   help="log the run to an experiment tracker (repeatable): tensorboard (event files in RUN/"
                        "tensorboard) or mlflow ($MLFLOW_TRACKING_URI, else mlruns.db beside the run)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    t = p.add_argument_group("trustworthy results")
    t.add_argument("--target", action="append", default=[], metavar="EXPR", dest="targets",
                   help="a goal checked on the test split, e.g. accuracy>=0.95, recall[tulip]>=0.9, specificity>=0.9, "
                        "macro_f1>=0.9 (repeatable); PASS/FAIL is printed and saved in metrics.json")
    t.add_argument("--fail-on-target", action="store_true", help="exit with status 1 when a --target is missed")
    t.add_argument("--folds", type=int, metavar="K",
                   help="k-fold cross-validation: K child runs on stratified folds (duplicates and groups kept in one "
                        "fold), mean ± std of every figure and the out-of-fold predictions of every image; classes "
                        "of 1-5 images train too (few-shot: the prototype classifier is tried beside the strategy); "
                        "a given test split is held out for the final model (--refit on: a final model without one)")
    t.add_argument("--audit", choices=("auto", "on", "off"), default="auto",
                   help="audit the data on the run's frozen features (label issues, image quality, duplicates, balance, "
                        "outliers -> RUN/audit/); auto: where the features are at hand and the data has at most 5,000 "
                        "images (seconds) (default: %(default)s)")
    t.add_argument("--exclude", metavar="FILE",
                   help="leave out the images listed in FILE (a CSV with a path or sha column, e.g. an audit's "
                        "label_issues.csv, or a text file of paths / content hashes); listed in skipped_files.csv")
    t.add_argument("--balance", choices=("none", "weights", "sampler"), default="none",
                   help="imbalance handling: class-weighted loss (weights; the probe uses class_weight='balanced') or a "
                        "class-balanced sampler (default: %(default)s)")
    t.add_argument("--drop-leaks", action="store_true",
                   help="remove val/test images that duplicate an image of an earlier split (listed in leaks.csv)")
    t.add_argument("--country", default="FRA", help="ISO 3166-1 alpha-3 code of the grid, for the CO2 figure "
                                                   "(default: %(default)s)")
    t.add_argument("--water-factor", type=float, default=1.8, dest="water_l_per_kwh", metavar="L_PER_KWH",
                   help="litres of water per kWh (default: %(default)s, US data-centre average on-site WUE)")


def _rgb(text: str) -> list[float]:
    """`0.485,0.456,0.406` -> three floats (checked further by TrainConfig)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B such as 0.485,0.456,0.406, got '{text}'")
    return values


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("seed", "epochs", "lr", "batch_size", "weight_decay", "layer_decay", "label_smoothing", "augment",
            "warmup_epochs", "patience", "head_init", "image_size", "grad_accum", "val_fraction", "test_fraction",
            "splits_from", "group_by", "min_per_class", "precision", "runtime", "num_workers", "trust_remote_code", "train_bn_stats", "train_image_size", "lr_min", "lora_rank", "lora_alpha", "mean", "std",
            "budget", "budget_factor", "interpolate", "tta", "refit", "init_from", "old_data", "keep",
            "replay_fraction", "distill_temperature", "distill_weight", "tasks", "task_weighting", "train_tasks",
            "unknown_values", "folds", "report_to", "image_column", "label_column", "audit", "exclude", "balance")
    kwargs = {k: getattr(args, k) for k in keys}
    kwargs["pretrained"] = not args.no_pretrained
    kwargs["resume"] = args.resume
    kwargs["models"] = [m.strip() for m in (getattr(args, "models", None) or "").split(",") if m.strip()]
    kwargs["candidates"] = [c for c in (getattr(args, "candidates", None) or "").split(",") if c.strip()]
    kwargs.update(targets=list(args.targets), drop_leaks=args.drop_leaks, country=args.country,
                  water_l_per_kwh=args.water_l_per_kwh)
    return kwargs


def _target_status(args: argparse.Namespace, run: Any) -> int:
    """1 when --fail-on-target is set and a target was missed (the PASS/FAIL lines are already printed)."""
    missed = [t for t in run.metrics.get("targets", []) if not t["passed"]]
    return 1 if args.fail_on_target and missed else 0


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `train` runs: its options, and with --config the file's where none was given on the command line."""
    options = {"data": args.data, "model": args.model, "strategy": args.strategy, "out": args.out,
               "quiet": args.quiet, "fail_on_target": args.fail_on_target, **_train_kwargs(args)}
    if not getattr(args, "config", None):
        if not options["data"]:
            raise AffinageError("the following argument is required: --data", "pass --data DATA or --config FILE")
        return options
    from .configfile import merge, read_config_file

    explicit = {"pretrained" if d == "no_pretrained" else d for d in getattr(args, "explicit", set())}
    return merge(read_config_file(args.config), options, explicit)


def cmd_train(args: argparse.Namespace) -> int:
    from .run import finetune

    options = _run_options(args)
    out, quiet, fail_on_target = options.pop("out"), options.pop("quiet"), options.pop("fail_on_target")
    args.fail_on_target = fail_on_target
    if options.get("folds") is not None:  # K child runs and their out-of-fold figures (crossval.py)
        from .crossval import cross_validate

        cv = cross_validate(out=out, progress=not quiet, **options)
        final = cv.metrics["cv"]["final"] or {}
        checks = [t for r in cv.metrics["cv"]["per_fold"] for t in r["targets"]] + final.get("targets", [])
        return 1 if fail_on_target and any(not t["passed"] for t in checks) else 0
    run = finetune(out=out, progress=not quiet, **options)
    return _target_status(args, run)


def cmd_demo(args: argparse.Namespace) -> int:
    from .run import finetune

    options = _run_options(args)
    out, quiet = options.pop("out"), options.pop("quiet")
    args.fail_on_target = options.pop("fail_on_target")
    run = finetune(out=out, progress=not quiet, **options)
    print(f"demo done: try `affinage predict {run.path} IMAGE --top-k 3`")
    return _target_status(args, run)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .predict import CsvWriter, expand_inputs, iter_predictions, text_line
    from .run import Run

    if args.top_k < 1:
        raise AffinageError(f"--top-k must be >= 1, got {args.top_k}", "pass --top-k 5 (or any positive number)")
    run = Run.load(args.run)
    files, unmatched = expand_inputs(args.images)
    if not files:
        raise AffinageError(f"no files found in {', '.join(args.images)}",
                            "pass image files, folders (searched recursively) or quoted globs such as 'photos/**/*.jpg'")
    k = min(args.top_k, len(run.classes))
    table = CsvWriter(sys.stdout, k, [t.task for t in run.tasks]) if args.csv else None
    results: list[dict[str, Any]] = []
    predictions = iter_predictions(run, files, top_k=k, batch_size=args.batch_size,
                                   progress=not args.quiet and sys.stderr.isatty())
    for r in itertools.chain(({"file": a, "error": why} for a, why in unmatched), predictions):
        results.append(r)
        if table is not None:
            table.write(r)
        elif not args.json:
            tqdm.write(text_line(r), file=sys.stdout)  # above the progress bar, not through it
    if args.json:
        print(json.dumps(results, indent=2))
    skipped = sum("error" in r for r in results)
    if skipped:
        print(f"affinage: skipped {skipped} of {len(results)} file(s), each listed with the reason", file=sys.stderr)
    return 1 if skipped == len(results) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.run, host=args.host, port=args.port, top_k=args.top_k, max_upload_mb=args.max_upload_mb,
          concurrency=args.concurrency)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    if args.push_to_hub:
        from .hub import check_repo_id

        if args.format.strip().lower() != "hf":
            raise AffinageError(f"--push-to-hub uploads an hf export, not {args.format}", "pass --format hf")
        check_repo_id(args.push_to_hub)  # offline or a malformed id: said before the export starts
    export_run(args.run, args.format, args.out, opset=args.opset)
    if args.push_to_hub:
        from .hub import push_folder

        push_folder(args.out, args.push_to_hub, private=args.private)
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from .runfiles import is_finished
    from .tracking import log_run

    trackers = [t for t in args.report_to if t != "none"]
    if not trackers:
        raise AffinageError("no tracker named", "pass --report-to tensorboard and/or --report-to mlflow")
    if not is_finished(args.run):
        raise AffinageError(f"'{args.run}' is not a finished affinage run", "pass the --out directory of a completed run")
    log_run(args.run, trackers)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from .envinfo import collect, format_env

    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_env(info))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .run import Run, evaluate_run

    test = evaluate_run(args.run, progress=not args.json)
    saved = Run.load(args.run).metrics.get("test", {})
    # Predictions must match exactly; the loss may move in its last digits when the thread count differs.
    same = {k: test[k] == saved.get(k) for k in ("accuracy", "macro_f1", "confusion_matrix")}
    same["loss"] = abs(test["loss"] - saved.get("loss", float("nan"))) <= 1e-6 * max(1.0, abs(test["loss"]))
    matches = all(same.values())
    if args.json:
        print(json.dumps({"test": test, "matches_training_run": matches,
                          "differs": [k for k, ok in same.items() if not ok],
                          "training_run_accuracy": saved.get("accuracy")}, indent=2))
    else:
        differs = ", ".join(k for k, ok in same.items() if not ok)
        print(f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}, macro F1 {test['macro_f1']:.4f} "
              f"(n={test['n']}); " + ("identical to the training-time figures" if matches else
                                      f"DIFFERS from the training-time figures ({differs})"))
    return 0 if matches else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit

    audit(args.data, model=args.model, out=args.out, task=args.task, group_column=args.group_column, seed=args.seed,
          folds=args.folds, image_size=args.image_size, progress=not args.quiet)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"report: {write_report(args.run)}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    result = reproduce(args.run, out=args.out, progress=not args.quiet)
    if result["identical"]:
        print(f"identical: every test figure and the whole history match ({result['hardware']}); rerun in {result['out']}")
        return 0
    print(f"DIFFERENT ({result['hardware']}); rerun in {result['out']}:")
    for line in result["differences"]:
        print(f"  {line}")
    return 1


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from .compare import compare

    extra = shlex.split(args.train_args or "")
    if args.image_size:
        extra += ["--image-size", str(args.image_size)]
    if args.init_from:
        extra += ["--init-from", args.init_from]
    if args.old_data:
        extra += ["--old-data", args.old_data]
    keeps = [k.strip() for k in (args.keep or "").split(",") if k.strip()]
    if keeps and not args.init_from:
        raise AffinageError("--keep needs --init-from (the model whose classes to keep)",
                            "pass --init-from RUN_DIR or --init-from pretrained")
    result = compare(data=args.data, model=args.model, strategies=[s for s in args.strategies.split(",") if s.strip()],
                     out=args.out, targets=args.target or [], seed=args.seed, train_args=extra, progress=not args.quiet,
                     keeps=keeps, tasks=args.tasks, multitask_baseline=args.multitask_baseline,
                     folds=args.folds)
    return 0 if result.cheapest is not None or not args.target else 1


# long-function: one declaration per subcommand, read top to bottom as the CLI reference; splitting it scatters --help
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affinage", description="Adapt a pretrained image model to your labelled "
                                     "images: pick a strategy, train, measure honestly, ship.")
    parser.add_argument("--version", action="version", version=f"affinage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end run: scikit-learn digits + built-in EfficientNet-Lite0",
                       description="Runs the whole pipeline offline on scikit-learn's handwritten digits with the "
                                   "built-in ImageNet EfficientNet-Lite0 (about a minute on 2 CPU cores).")
    _add_train_options(p, data_required=False)
    # Digits are 8x8 pixels and far from ImageNet: fine-tune everything, at 128 px (224 adds nothing but time).
    p.set_defaults(func=cmd_demo, strategy=DEMO_PRESET["strategy"], image_size=DEMO_PRESET["image_size"],
                   train_image_size=DEMO_PRESET["train_image_size"], epochs=DEMO_PRESET["epochs"],
                   augment=DEMO_PRESET["augment"])

    p = sub.add_parser("train", help="fine-tune a backbone on your data and write a run directory",
                       description="Train with one strategy and write a run directory (config, split lists, skipped "
                                   "files, history, metrics.json, model).")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("audit", help="check the data before training: label issues, image quality, duplicates, "
                                     "balance and bias, outliers",
                       description="Audit a dataset on the frozen features (cached): label-issue candidates from a "
                                   "k-fold probe's out-of-fold probabilities (cleanlab), image-quality checks, "
                                   "duplicates within and across splits, class balance and the class x group table, "
                                   "feature-space outliers. Writes audit.html (self-contained), label_issues.csv, "
                                   "image_issues.csv, duplicates.csv and audit.json; never changes the data.")
    p.add_argument("--data", required=True, help="as for `affinage train`")
    p.add_argument("--model", default=DEMO_MODEL, help="backbone whose features are audited (default: %(default)s)")
    p.add_argument("--task", help="the CSV's label column to audit (default: the column `label`)")
    p.add_argument("--group-column", help="a CSV column naming each image's group (site, season, usage...): the "
                                          "class x group table and its warnings")
    p.add_argument("--out", default=None, help="new directory for the audit (default: runs/<date-time>-audit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of the splits `train` would make")
    p.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold probe (default: %(default)s)")
    p.add_argument("--image-size", type=int, help="as for `affinage train`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("predict", help="label images with a trained run", description="Predict labels for image files "
                       "with the model of a run directory (same preprocessing as training).")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("images", nargs="+",
                   help="image files, folders (searched recursively) or quoted globs such as 'photos/**/*.jpg'")
    p.add_argument("--top-k", type=int, default=5, help="labels to list per image (default: 5)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON: one object per image with label, probability and top_k")
    fmt.add_argument("--csv", action="store_true", help="CSV: file,label,probability[,label_2,probability_2...],error")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and predicted together (default: 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="a local web page and API that label uploaded photos",
                       description="Serve a run directory as a Gradio page (drop a photo, see the top labels) with a "
                                   "/predict API, using the run's own preprocessing. Local only unless --host says "
                                   "otherwise; never a public share link; no analytics.")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, this machine only; "
                                                       "0.0.0.0 exposes it to the network without authentication)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per photo (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32,  # serve.DEFAULT_CONCURRENCY (not imported: gradio is heavy)
                   help="requests in the handler at once (decoding or waiting); the model batches those that arrive "
                        "together (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write the model as ONNX, transformers or timm, loadable without affinage",
                       description="Export a run's model to a folder that loads without affinage (onnxruntime, "
                                   "transformers from_pretrained, or timm create_model('local-dir:...')), with "
                                   "config.json (label map), preprocessor_config.json and a model card. The export "
                                   "is reloaded and compared with the run's model before the folder is written.")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--format", required=True, help="onnx (any run), hf (transformers backbones, and timm ones through "
                                                   "transformers' TimmWrapper) or timm (timm and built-in backbones)")
    p.add_argument("--out", required=True, help="new folder to write (an existing non-empty one is refused)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default: %(default)s)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="with --format hf: upload the checked folder to this "
                                                            "Hugging Face Hub model repository (huggingface_hub's login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("track", help="log a finished run to TensorBoard / MLflow (as train --report-to does)",
                       description="Log a finished run directory to experiment trackers: per-epoch curves, config, "
                                   "test figures, footprint and (MLflow) its files as artifacts, read from the "
                                   "directory alone.")
    p.add_argument("run", help="run directory")
    p.add_argument("--report-to", action="append", default=[], choices=REPORT_TO, dest="report_to", required=True,
                   help="tensorboard (RUN/tensorboard) or mlflow ($MLFLOW_TRACKING_URI, else mlruns.db beside the "
                        "run); repeatable")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("env", help="versions, hardware, accelerate config and caches, to paste into a bug report",
                       description="Print affinage's environment in one block: package versions, CPU/GPU, "
                                   "accelerate's config, cache locations and the relevant environment variables.")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("eval", help="re-evaluate a run on its saved test split", description="Reload a run directory "
                       "and re-evaluate it on its test split; reports whether it matches the training-time figures "
                       "(exit status 1 when it does not).")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="(re)write report.html of a run", description="Rebuild the self-contained "
                       "report.html of a run directory (curves, confusion matrix, per-class and per-group metrics, "
                       "calibration, leaks, targets, diagnosis, footprint) from its files alone.")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reproduce", help="re-run a run from its directory and check the figures are identical",
                       description="Train again from the run directory alone (config.yaml, seed and split lists) into "
                                   "a sibling directory and compare test metrics and history; prints 'identical' or "
                                   "the figures that differ (exit 1). On CPU the test metrics are bit-identical.")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="directory of the rerun (default: RUN-reproduce-<date-time> beside RUN)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("compare", help="run several strategies on the same split and compare accuracy, time, energy",
                       description="Every strategy on the same data, split and seed, each as its own `affinage train` "
                                   "run, cold (its own empty cache: each decodes the images and extracts features "
                                   "itself, so times and energies compare); writes compare.csv, compare.md and "
                                   "compare.png (accuracy vs wall time, point size = energy); marks the row auto would "
                                   "pick and names the cheapest strategy within 0.01 of the best, both chosen on val "
                                   "(test is shown, never used to choose).")
    p.add_argument("--data", required=True, help="as for `affinage train`")
    p.add_argument("--model", default=DEMO_MODEL, help="backbone, as for `affinage train` (default: %(default)s)")
    p.add_argument("--strategies", default=",".join(COMPARE_STRATEGIES),
                   help="comma-separated strategies (default: %(default)s)")
    p.add_argument("--target", action="append", metavar="EXPR",
                   help="e.g. accuracy>=0.95 (repeatable); the cheapest strategy meeting all of them is named")
    p.add_argument("--out", default=None, help="new directory for the comparison and its runs")
    p.add_argument("--seed", type=int, default=0, help="seed shared by every run (default: 0)")
    p.add_argument("--image-size", type=int, help="input size for every run (default: the checkpoint's)")
    p.add_argument("--train-args", help="more `affinage train` options for every run, quoted, e.g. \"--epochs 5\"")
    p.add_argument("--init-from", metavar="RUN|pretrained", help="as for `affinage train`: add the data's classes to "
                                                                 "this classifier's")
    p.add_argument("--old-data", metavar="DATA", help="as for `affinage train`: the old task's labelled images")
    p.add_argument("--keep", metavar="MODES", help="with --init-from: compare these ways of keeping the old task, "
                                                   "e.g. none,replay,distill,replay+distill (one run per strategy "
                                                   "and mode; old/new accuracy and forgetting in the table)")
    p.add_argument("--task", action="append", default=[], metavar="COLUMN", dest="tasks",
                   help="as for `affinage train`: a label column of the CSV (repeatable: multi-task runs)")
    p.add_argument("--multitask-baseline", action="store_true",
                   help="with several --task: also train each task alone (same images, splits and strategy) and "
                        "report the per-task difference and LibMTL's Delta_m (multitask.csv)")
    p.add_argument("--folds", type=int, metavar="K", help="cross-validate every strategy on the same K folds "
                                                          "(affinage train --folds K); rows show the mean ± std")
    p.add_argument("--quiet", action="store_true", help="no progress bars in the runs")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # torch 2.15 can print this kernel-registration notice at import in a fresh environment: noise, not the user's
    warnings.filterwarnings("ignore", message=r"Warning only once for all operators", category=UserWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if getattr(args, "config", None):  # which options the command line gave: those override the file's
        args.explicit = _explicit_options(parser, args.command, list(sys.argv[1:] if argv is None else argv))
    func: Callable[[argparse.Namespace], int] = args.func
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        from .data import PRINTABLE_ERRORS

        sys.stdout.reconfigure(errors=PRINTABLE_ERRORS)  # file names need not be UTF-8: print \xNN, never crash
    try:
        return func(args)
    except AffinageError as exc:
        print(f"affinage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("affinage: interrupted", file=sys.stderr)
        return 130


def _explicit_options(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> set[str]:
    """The dests of the options present on the command line of `command` (parsed again with no defaults)."""
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = sub_action.choices[command]
    for action in sub._actions:
        action.default, action.required = argparse.SUPPRESS, False
    sub._defaults.clear()
    given, _ = sub.parse_known_args(argv[argv.index(command) + 1:])
    return set(vars(given))


def entry() -> None:
    """The `affinage` console script: `main()`, then a fast exit.

    When a command returns, its files are written (atomically) and closed. Tearing the interpreter down after that,
    freeing torch's, matplotlib's and pandas' objects one by one, takes 0.5-1 s on a small CPU: a third of a
    cached linear-probe run. So the process ends right after the exit handlers have run and the output streams are
    flushed, as `os._exit` does. Only the command line does this; the Python API (`main()` included) returns
    normally. An unexpected exception still ends the usual way, with its traceback.
    """
    import atexit
    import gc
    import os

    # Importing torch, timm, matplotlib... creates about a million long-lived objects, and the default thresholds
    # make the collector walk them all again and again while they load (0.4 s of a cached run). Collect rarely,
    # as mypy does for the same reason; training allocates tensors, not reference cycles.
    gc.set_threshold(200_000, 30, 30)
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # logging, thread pools, tqdm: what exit runs
    if run_exit_handlers is None:  # pragma: no cover - every CPython has it; else leave the slow, normal way
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`affinage predict ... | head -1`): nothing more to say
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    entry()
