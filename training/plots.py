"""The learning curve written at the end of every run."""

from __future__ import annotations

import json
from pathlib import Path


def learning_curve(metrics_path: Path, out: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for split, style in (("train", "-"), ("valid", "o-")):
        points = [(r["tokens"], r[metric]) for r in records if r["split"] == split and metric in r]
        if points:
            ax.plot(*zip(*points), style, label=split, markersize=4)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("perplexity" if metric == "ppl" else metric)
    if metric == "ppl":
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
