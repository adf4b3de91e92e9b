"""affinage quickstart, as a script or pasted cell by cell into a notebook (`# %%` marks the cells).

    python examples/quickstart.py --data ../shared/data/hymenoptera --out runs/quickstart

In Jupyter, the last line of a cell `run` shows the run's summary (metrics, learning curves, confusion matrix),
and training shows notebook progress bars (tqdm.auto). The tests run this script on tiny generated images.
"""
# %%
import argparse
import csv
from pathlib import Path

import affinage

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default="../shared/data/hymenoptera", help="a folder of class subfolders, a CSV, ...")
parser.add_argument("--model", default="efficientnet_lite0", help="backbone (built-in, timm:, hf: or a local folder)")
parser.add_argument("--out", default="runs/quickstart", help="new run directory")
args, _ = parser.parse_known_args()  # in a notebook, Jupyter's own arguments are left alone

# %% Train: a linear probe on frozen features, the cheapest strong baseline (seconds once features are cached)
run = affinage.finetune(data=args.data, model=args.model, strategy="linear-probe", out=args.out)
print(f"test accuracy {run.metrics['test']['accuracy']:.3f} on {run.metrics['test']['n']} held-out images")

# %% Look: in a notebook, `run` alone on the last line renders this HTML summary
summary = run._repr_html_()
Path(args.out, "summary.html").write_text(summary, encoding="utf-8")

# %% Predict: a reloaded run needs nothing but its directory
reloaded = affinage.load_run(args.out)
with open(Path(args.out, "splits", "test.csv"), newline="", encoding="utf-8") as fh:
    photos = [row["path"] for row in csv.DictReader(fh)][:2]
for result in reloaded.predict(photos, top_k=2):
    print(result["file"], "->", result.get("label"), f"{result.get('probability', 0):.2f}")
