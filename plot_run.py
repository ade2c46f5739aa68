"""
Draw a run's loss curves into a PNG: train and val loss against tokens, every phase of a grown model on one axis.

    python plot_run.py out/tiny_stack                    # -> out/tiny_stack/curves.png
    python plot_run.py out/tiny --out tiny.png

The phases come from the checkpoint's history (train.py writes one entry per run, stack.py one per growth): each
train phase's metrics.jsonl, in the out_dir its entry names, is drawn after the tokens of the phases before it,
and a growth is a dashed line at the tokens where it happened, with the val loss of the model before and after it.
A phase whose metrics.jsonl is gone is left out (its tokens still count). The right axis gives the val loss in
bits per byte, where every phase measured the same val set. stdout: the path written.
"""

import stopping

# first of all, before torch takes a second or two to import: a signal meanwhile ends in one line too
if __name__ == "__main__":
    stopping.stop_on_signals("stopped by {signal}: no plot was written (it is written whole or not at all)")

import argparse
import os
import sys

import checkpoint
from common import atomic_write, log


def phases(history):
    """(train phases, growths): [(offset, entry, metrics)], [(offset, entry)], offset = tokens of the phases before."""
    trains, growths, offset = [], [], 0
    for entry in history:
        if entry["event"] == "train":
            metrics = checkpoint.read_metrics(entry["out_dir"])
            if metrics:
                trains.append((offset, entry, metrics))
            else:
                log(f"no metrics.jsonl in {entry['out_dir']}: its phase is left out of the plot")
            offset += entry["tokens"]
        elif entry["event"] == "stack":
            growths.append((offset, entry))
    return trains, growths


def plot(trains, growths, title, path):
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    val_losses, train_losses, bpb_per_nat = [], [], set()
    for number, (offset, entry, metrics) in enumerate(trains, 1):
        train = [(offset + e["tokens"], e["loss"]) for e in metrics if "loss" in e]
        val = [(offset + e["tokens"], e["val_loss"]) for e in metrics if "val_loss" in e]
        bpb_per_nat |= {
            round(e["val_bpb"] / e["val_loss"], 6) if e.get("val_bpb") else None for e in metrics if "val_loss" in e
        }
        color = f"C{number - 1}"
        if train:
            ax.plot(
                [t / 1e6 for t, _ in train],
                [loss for _, loss in train],
                color=color,
                alpha=0.45,
                lw=1,
                label=f"phase {number} train ({entry['out_dir']})",
            )
        ax.plot(
            [t / 1e6 for t, _ in val],
            [loss for _, loss in val],
            color=color,
            marker="o",
            ms=4,
            label=f"phase {number} val",
        )
        val_losses += [loss for _, loss in val]
        train_losses += [loss for _, loss in train]
    for offset, entry in growths:
        ax.axvline(offset / 1e6, color="0.3", ls="--", lw=1)
        # left of the line: the grown phase, usually the shorter, leaves too little room on its right
        ax.annotate(
            f"{entry['method']}: {entry['n_layer'][0]} -> {entry['n_layer'][1]} layers ",
            (offset / 1e6, 1),
            xycoords=("data", "axes fraction"),
            va="top",
            ha="right",
            fontsize=8,
        )
        if entry.get("val_loss") is not None:
            ax.plot(
                [offset / 1e6] * 2,
                [entry["val_loss_source"], entry["val_loss"]],
                color="0.3",
                marker="x",
                ls="",
                label="val before and after growth" if offset == growths[0][0] else None,
            )
            val_losses += [entry["val_loss_source"], entry["val_loss"]]
    if val_losses:  # the first steps' loss (ln vocab) is off the top: the rest is what a reader compares
        ax.set_ylim(
            min(val_losses + train_losses) - 0.1, min(max(val_losses), sorted(val_losses)[len(val_losses) // 4] + 2.0)
        )
    if len(bpb_per_nat) == 1 and None not in bpb_per_nat:  # one val set throughout: bits per byte scale with nats
        k = bpb_per_nat.pop()
        ax.secondary_yaxis("right", functions=(lambda x: x * k, lambda x: x / k)).set_ylabel("val bits per byte")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train.py out_dir, or a checkpoint file")
    p.add_argument(
        "--out", default=None, help="the PNG to write (default: RUN/curves.png, or beside a checkpoint file)"
    )
    args = p.parse_args(argv)
    try:
        ckpt = checkpoint.load(args.run)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    trains, growths = phases(ckpt.get("history", []))
    if not trains:
        sys.exit(f"error: no phase of {args.run} has its metrics.jsonl at hand: nothing to plot")
    last = ckpt["history"][-1]
    tokens = sum(e["tokens"] for e in ckpt["history"] if e["event"] == "train")
    title = f"{args.run}: {ckpt['model_args']['n_layer']} layers, {tokens / 1e6:.2f}M tokens"
    if last.get("val_loss") is not None:
        title += f"; final val {last['val_loss']:.3f} nats/token" + (
            f", {last['val_bpb']:.3f} bits/byte" if last.get("val_bpb") else ""
        )
    path = args.out or os.path.join(args.run if os.path.isdir(args.run) else os.path.dirname(args.run), "curves.png")
    plot(trains, growths, title, path)
    print(path)


if __name__ == "__main__":
    main()
