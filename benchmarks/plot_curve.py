"""Plot a run's learning curve from its TensorBoard event file and print it as a Markdown table.

    python benchmarks/plot_curve.py runs/quickstart/version_0 --out docs/quickstart_curve.png

The plot shows train/bpd (per logged step) and val/bpd against the optimizer step, with the wall-clock minutes of
each validation marked on the top axis. The table lists every validation: step, minutes since the first logged
step, the last train/bpd before it, and val/bpd.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sparse.atomic import atomic_write


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar tag of the event file(s) in ``log_dir`` as (step, wall_time, value) lists."""
    if not any(log_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(
            f"{log_dir} holds no TensorBoard event file; pass a run folder such as runs/quickstart/version_0"
        )
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def markdown_table(scalars: dict[str, list[tuple[int, float, float]]]) -> str:
    """One row per validation: step, minutes, last train/bpd, val/bpd."""
    train, val = scalars.get("train/bpd", []), scalars.get("val/bpd", [])
    if not val:
        raise ValueError("the run logged no val/bpd; nothing to tabulate")
    start = min(t for _, t, _ in train + val)
    rows = ["| step | minutes | train bpd | val bpd |", "|---:|---:|---:|---:|"]
    for step, wall, value in val:
        before = [v for s, _, v in train if s <= step]
        last_train = f"{before[-1]:.3f}" if before else "–"
        rows.append(f"| {step} | {(wall - start) / 60:.1f} | {last_train} | {value:.3f} |")
    return "\n".join(rows)


def plot(scalars: dict[str, list[tuple[int, float, float]]], out: Path, title: str) -> None:
    """Write the learning-curve PNG to ``out`` (through a temporary file and a rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    train, val = scalars.get("train/bpd", []), scalars["val/bpd"]
    if train:
        ax.plot([s for s, _, _ in train], [v for _, _, v in train], lw=0.8, alpha=0.6, label="train/bpd (per batch)")
    ax.plot([s for s, _, _ in val], [v for _, _, v in val], "o-", lw=2, label="val/bpd")
    for step, _, value in val:
        ax.annotate(f"{value:.2f}", (step, value), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.axhline(3.0, color="gray", ls="--", lw=0.8, label="3.0 bits (target)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(0, 8.2)
    ax.grid(alpha=0.3)
    start = min(t for _, t, _ in train + val)
    top = ax.secondary_xaxis("top")
    top.set_ticks([s for s, _, _ in val], labels=[f"{(t - start) / 60:.1f}" for _, t, _ in val])
    top.set_xlabel("minutes since the first logged step (at each validation)")
    ax.set_title(title, fontsize=10, pad=12)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(out) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="run folder holding the TensorBoard event file")
    parser.add_argument("--out", type=Path, default=Path("docs/quickstart_curve.png"), help="PNG to write")
    parser.add_argument("--title", default="lightning-sparse quickstart (configs/quickstart.yaml)")
    args = parser.parse_args()
    scalars = read_scalars(args.log_dir)
    print(markdown_table(scalars))
    plot(scalars, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
