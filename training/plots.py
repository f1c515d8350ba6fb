"""The loss curve people would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt


def plot_loss_curve(log_history: list[dict[str, Any]], loss_before: float, path: Path) -> None:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    validation = [(0, loss_before)] + [
        (e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", color="tab:blue")
    ax.plot(*zip(*validation, strict=True), "o-", label="validation", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("tailorgpt training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
