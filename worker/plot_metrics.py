#!/usr/bin/env python3
"""Turns an mx_train metrics log (--metrics_log=run.csv or run.jsonl) into a
PNG with loss and accuracy curves per epoch.

  worker/plot_metrics.py run.csv run.png

Needs Debian's python3-matplotlib.
"""
import csv
import json
import sys


def read(path):
    if path.endswith(".csv"):
        with open(path) as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_metrics.py METRICS_LOG OUT.png")
    rows = read(sys.argv[1])
    if not rows:
        sys.exit(f"{sys.argv[1]}: no records")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("matplotlib is missing: apt-get install python3-matplotlib")
    epochs = [r["epoch"] for r in rows]
    panels = [("loss (cross-entropy)", "cross-entropy"), ("accuracy", "accuracy")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, key) in zip(axes, panels):
        for split in ("train", "eval"):
            col = f"{split}_{key}"
            if col in rows[0]:
                ax.plot(epochs, [r[col] for r in rows], marker="o", label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
