"""What the study scripts (``experiments/study_*.py``) share: their start-up (one BLAS
thread unless the caller chose, the repository root on ``sys.path``), atomic JSON writes,
cosines, and the per-unit gradient-alignment plot.

Import it first in a study script, before NumPy::

    import study_common as sc  # isort: skip  (sets OMP_NUM_THREADS, sys.path)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# one BLAS thread per study process: the studies run beside other work on a few cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def command(script: str) -> str:
    """The command line that ran this study (recorded in every run's JSON)."""
    return " ".join(["python", f"experiments/{script}"] + sys.argv[1:])


def write_json(path: Path, obj):
    """Write ``obj`` as JSON atomically (a killed study never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def load_runs(folder: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def study_args(p, name: str, eval_every: int):
    """The options both studies share (`name`: the study's folder under experiments/)."""
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / name)
    p.add_argument("--data", type=Path, default=None,
                   help="where the generated datasets go (default: $SSMPI_STUDY_DATA or "
                   f"/tmp/ssmpi_{name}_data)")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--methods", default="", help="comma-separated methods (default: per variant)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=0, help="override iterations")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--align-every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny smoke run into <out>/quick")
    p.add_argument("--report-only", action="store_true")
    return p


def grouped(runs, variants, methods) -> list:
    """[((variant, method), its runs by seed)] in the order the study lists its variants."""
    groups = {}
    for r in runs:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    order = {v[0]: i for i, v in enumerate(variants)}
    return [(key, sorted(rs, key=lambda r: r["seed"])) for key, rs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), methods.index(kv[0][1])))]


def mean_cosines(runs, key: str = "cos") -> str:
    """``c1 / c2 / ...``: the mean per-unit pseudo/exact cosine over the last half of each
    run's alignment records (``-`` when there are none)."""
    al = [a for r in runs for a in r["align"][len(r["align"]) // 2:] if a.get(key)]
    if not al:
        return "-"
    return " / ".join(f"{nanmean([a[key][u] for a in al]):.2f}"
                      for u in sorted(al[0][key], key=int))


def cosine(a, b) -> float:
    """cos(a, b) of two flat vectors (nan when one is zero)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def nanmean(xs) -> float:
    """Mean of the finite values (nan when there are none, e.g. a unit without parameters)."""
    xs = [x for x in xs if x == x]
    return float(np.mean(xs)) if xs else float("nan")


def pseudo_gradients(eng) -> dict:
    """{unit: the engine's accumulated pseudo-gradient / valid steps} (what update applies)."""
    return {l: np.asarray(u.grad / max(u.count, 1), np.float64) for l, u in eng.units.items()}


def plot_alignment(runs, path):
    """One panel per run: its per-unit cosine(pseudo-gradient, exact BPTT gradient) curves
    (``run["align"]``: [{"it", "cos": {unit: cosine}}]), written to ``path`` (PNG)."""
    if not runs:
        return
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncol = min(4, len(runs))
    nrow = -(-len(runs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, runs):
        its = [a["it"] for a in r["align"]]
        for u in sorted(r["align"][0]["cos"], key=int):
            ax.plot(its, [a["cos"][u] for a in r["align"]], label=f"U{u}")
        ax.set_title(r["key"], fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_ylim(-1, 1)
        ax.axhline(0, color="gray", lw=0.5)
    axes[0][0].set_ylabel("cos(pseudo-grad, BPTT grad)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)  # many panels: keep the PNG well under 1 MB
    plt.close(fig)
