"""Loss curves and summary tables for stage notebooks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd


def read_metrics(path: str | Path) -> pd.DataFrame:
    """The training logs of ``metrics.jsonl`` (one row per logged step)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: did the stage run?")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not JSON: {err}") from None
            warnings.warn(f"{path}: its last line is cut short (the run stopped while writing it); left out",
                          stacklevel=2)
    frame = pd.DataFrame([r for r in rows if "loss" in r])
    if frame.empty:
        raise ValueError(f"{path} holds no training log rows")
    return frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def loss_columns(metrics: pd.DataFrame) -> list[str]:
    """The language loss, then every auxiliary term the model reported."""
    lm = ["lm_loss"] if "lm_loss" in metrics else ["loss"]
    return lm + sorted(c for c in metrics.columns if c.startswith("aux/"))


def plot_losses(metrics: pd.DataFrame, title: str = "", out_png: str | Path | None = None):
    """One panel per loss component (``lm_loss``, each ``aux/...`` term as weighted into the loss)
    against the step; saved as PNG when ``out_png`` is given. The backend is left alone: a notebook
    shows the figure inline (switching to Agg to save it hid every later figure of the kernel)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    columns = loss_columns(metrics)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.0), squeeze=False)
    for ax, column in zip(axes[0], columns):
        sns.lineplot(data=metrics, x="step", y=column, ax=ax, marker="o" if len(metrics) < 30 else None)
        # aux/<placement>/<term>: the term as the loss adds it (coefficient x sum over the layers),
        # not the per-layer router/<placement>/<term> a table next to it may show
        ax.set_title(f"{column}\n(coef x sum over layers)" if column.startswith("aux/") else column)
        ax.set_ylabel("")
    fig.suptitle(title)
    fig.tight_layout()
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110)
    return fig


def stage_summary(stage_dir: str | Path, metrics: pd.DataFrame) -> pd.DataFrame:
    """One row: steps, first and last language loss, mean tokens/s, where the model is; the count of
    non-finite steps (NaN/inf loss or gradients, updates skipped) when there were any."""
    lm = loss_columns(metrics)[0]
    row = {
        "stage": Path(stage_dir).name,
        "steps": int(metrics["step"].max()),
        f"first {lm}": round(float(metrics[lm].iloc[0]), 4),
        f"last {lm}": round(float(metrics[lm].iloc[-1]), 4),
        "tokens/s": round(float(metrics["tokens_per_s"].mean()), 1) if "tokens_per_s" in metrics else None,
        "model": str(Path(stage_dir) / "final"),
    }
    nonfinite = int(metrics["nonfinite_steps"].max()) if "nonfinite_steps" in metrics else 0
    if nonfinite:
        row["non-finite steps"] = nonfinite
    for column in loss_columns(metrics)[1:]:
        row[f"last {column}"] = round(float(metrics[column].iloc[-1]), 4)
    return pd.DataFrame([row])
