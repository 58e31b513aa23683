"""Loss and accuracy curves of a run as PNG: ``python -m ssmpi.plot runs/<name>/ [more runs]``.

Reads ``metrics.jsonl`` of each run and writes ``loss.png`` and ``accuracy.png`` into the
first run folder (or ``--out``). Several runs are drawn on the same axes (e.g. Sideways next
to Skip-Sideways). Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir) -> dict:
    """{"train": [(iteration, loss, acc)], "eval": [(iteration, clip_acc)], "final": {...}}."""
    out = {"train": [], "eval": [], "final": None}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run folder?)")
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if m.get("final"):
            out["final"] = m
            ev = m.get("eval") or {}
            if "clip_acc" in ev:
                out["eval"].append((m["iterations"], ev["clip_acc"]))
        elif "eval" in m:
            ev = m["eval"] or {}
            if "clip_acc" in ev:
                out["eval"].append((m["iteration"], ev["clip_acc"]))
        elif "iteration" in m:
            out["train"].append((m["iteration"], m.get("loss"), m.get("acc")))
    return out


def _smooth(ys, k):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot(runs, out_dir, smooth: int = 10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    data = {Path(r).name: read_metrics(r) for r in runs}
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in data.items():
        pts = [(i, loss) for i, loss, _ in m["train"] if loss is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, _smooth(ys, smooth), label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"training loss (mean of {smooth})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in data.items():
        pts = [(i, a) for i, _, a in m["train"] if a is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, _smooth(ys, smooth), label=f"{name} (train clips)", alpha=0.6)
        if m["eval"]:
            xs, ys = zip(*m["eval"])
            ax.plot(xs, ys, "o-", label=f"{name} (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("clip accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssmpi.plot", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl)")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the first run)")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window")
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.stderr.write("ssmpi.plot: error: needs matplotlib (pip install matplotlib)\n")
        return 2
    try:
        paths = plot(a.runs, a.out or a.runs[0], a.smooth)
    except FileNotFoundError as e:
        sys.stderr.write(f"ssmpi.plot: error: {e}\n")
        return 2
    for p in paths:
        sys.stdout.write(f"wrote {p}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
