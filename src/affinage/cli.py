"""The `affinage` command: thin parsers over the Python API. Problems print one line, no traceback."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import AUGMENT_PRESETS, PRECISIONS, STRATEGY_NAMES
from .errors import AffinageError

DEMO_DATA = "digits"
DEMO_MODEL = "efficientnet_lite0"
DEMO_STRATEGY = "linear-probe"
DEMO_PRESET = {"strategy": "full", "image_size": 128, "train_image_size": 128, "epochs": 4}  # `affinage demo`: ~0.96 test accuracy, ~1.5 min on 2 CPU cores


def _add_train_options(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--data", required=data_required, default=None if data_required else DEMO_DATA,
                   help="a folder of class subfolders, a folder with train/val[/test] subfolders, a CSV "
                        "(path,label[,split][,group]), hf:<dataset id>[:config], or 'digits'")
    g.add_argument("--model", default=DEMO_MODEL,
                   help="backbone: efficientnet_lite0 / efficientnet_lite2 (built-in, offline), timm:<name>, "
                        "hf:<org/name>, or a local folder with config.json + weights (default: %(default)s)")
    g.add_argument("--strategy", default=DEMO_STRATEGY,
                   help=f"one of {', '.join(STRATEGY_NAMES)} (default: %(default)s)")
    g.add_argument("--out", default=None, help="new run directory (default: runs/<date-time>-<strategy>); "
                                               "an existing non-empty directory is refused")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, init and data order (default: 0)")
    h = p.add_argument_group("hyper-parameters (defaults depend on the strategy)")
    h.add_argument("--epochs", type=int, help="training epochs")
    h.add_argument("--lr", type=float, help="peak learning rate of the head; backbone blocks get less")
    h.add_argument("--batch-size", type=int, help="images per step (default: 32, 128 on cached features)")
    h.add_argument("--weight-decay", type=float, help="AdamW weight decay (never on biases/norms)")
    h.add_argument("--layer-decay", type=float, help="LR multiplier per block going down from the head, in (0, 1]")
    h.add_argument("--label-smoothing", type=float, default=0.1, help="default: %(default)s")
    h.add_argument("--augment", choices=AUGMENT_PRESETS, default="light", help="augmentation preset (default: light)")
    h.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warmup before cosine decay (default: 0.5)")
    h.add_argument("--patience", type=int, help="early stopping: epochs without val improvement")
    h.add_argument("--head-init", choices=("probe", "random"), default="probe",
                   help="unfreezing strategies start from a head fitted on frozen features (probe, default) or random")
    h.add_argument("--train-bn-stats", action="store_true",
                   help="let BatchNorm re-estimate its statistics while fine-tuning (default: keep the pretrained ones)")
    h.add_argument("--image-size", type=int, help="override the checkpoint's input size (pixels)")
    h.add_argument("--train-image-size", type=int,
                   help="training crop size (default: 80%% of the eval size for convnets, equal for ViTs)")
    h.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    d = p.add_argument_group("data and hardware")
    d.add_argument("--val-fraction", type=float, default=0.15, help="carved from train when no val split is given")
    d.add_argument("--test-fraction", type=float, default=0.15, help="carved when no test split is given")
    d.add_argument("--splits-from", help="reuse the split lists of an earlier run directory")
    d.add_argument("--group-by", help="regex on the path whose first group names a sample's group (bias metrics)")
    d.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16/fp16 on GPU; fp32 training and bf16 inference on CPUs with AVX512-BF16")
    d.add_argument("--num-workers", type=int, help="DataLoader workers (default: 0 on CPU, up to 8 on GPU)")
    d.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")
    d.add_argument("--trust-remote-code", action="store_true", help="allow custom code from a Hub model repo")
    d.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("seed", "epochs", "lr", "batch_size", "weight_decay", "layer_decay", "label_smoothing", "augment",
            "warmup_epochs", "patience", "head_init", "image_size", "grad_accum", "val_fraction", "test_fraction",
            "splits_from", "group_by", "precision", "num_workers", "trust_remote_code", "train_bn_stats", "train_image_size")
    kwargs = {k: getattr(args, k) for k in keys}
    kwargs["pretrained"] = not args.no_pretrained
    return kwargs


def cmd_train(args: argparse.Namespace) -> int:
    from .run import finetune

    finetune(data=args.data, model=args.model, strategy=args.strategy, out=args.out, progress=not args.quiet,
             **_train_kwargs(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .run import finetune

    run = finetune(data=args.data, model=args.model, strategy=args.strategy, out=args.out, progress=not args.quiet,
                   **_train_kwargs(args))
    print(f"demo done: try `affinage predict {run.path} IMAGE --top-k 3`")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .run import Run

    run = Run.load(args.run)
    results = run.predict(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: skipped ({r['error']})")
            else:
                tops = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
                print(f"{r['file']}: {r['label']} — {r['probability']:.3f}   [{tops}]")
    return 1 if all("error" in r for r in results) else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .run import Run, evaluate_run

    test = evaluate_run(args.run, progress=not args.json)
    saved = Run.load(args.run).metrics.get("test", {})
    same = {k: test[k] == saved.get(k) for k in ("accuracy", "loss", "macro_f1")}
    if args.json:
        print(json.dumps({"test": test, "matches_training_run": all(same.values())}, indent=2))
    else:
        print(f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}, macro F1 {test['macro_f1']:.4f} "
              f"(n={test['n']}); {'identical to' if all(same.values()) else 'DIFFERS from'} the training-time figures")
    return 0


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
                   train_image_size=DEMO_PRESET["train_image_size"], epochs=DEMO_PRESET["epochs"])

    p = sub.add_parser("train", help="fine-tune a backbone on your data and write a run directory",
                       description="Train with one strategy and write a run directory (config, split lists, skipped "
                                   "files, history, metrics.json, model).")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="label images with a trained run", description="Predict labels for image files "
                       "with the model of a run directory (same preprocessing as training).")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5, help="labels to list per image (default: 5)")
    p.add_argument("--json", action="store_true", help="JSON: one object per image with label and top_k")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="re-evaluate a run on its saved test split", description="Reload a run directory "
                       "and re-evaluate it on its test split; reports whether it matches the training-time figures.")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AffinageError as exc:
        print(f"affinage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("affinage: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
