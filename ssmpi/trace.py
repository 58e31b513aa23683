"""Per-rank timelines: compute, waiting for messages, data; Chrome trace JSON and a Gantt plot.

Every rank owns one :class:`Tracer`. Code wraps intervals in ``with tracer.span(name, cat):``;
each span becomes one event (name, category, start, duration, step, rank). After the step
loop, :meth:`Tracer.dump` gathers every rank's events on rank 0 (one ``gather``: a collective,
never inside the step loop) and writes

- ``path`` (``.json``): Chrome trace event format, one row ("thread") per rank; open it in
  https://ui.perfetto.dev or ``chrome://tracing``;
- the same path with ``.png``: a Gantt chart (rank x time, one colour per category) when
  matplotlib is importable; otherwise no PNG, and :meth:`dump` says so in its return value.

Categories used by ssmpi (any string works):

==========  ============================================================
``compute`` a unit's forward + VJP (engine), a stage's forward or backward (GPipe)
``wait``    waiting for messages (``Exchange.wait``, GPipe's polling waits)
``data``    fetching / slicing the input frame
``update``  the optimizer step at the end of a clip
==========  ============================================================

Clocks: events are stamped with ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, shared by
all processes of one machine). Ranks on other hosts are aligned with a barrier at
:meth:`dump` (error: the barrier's exit skew, typically microseconds).

A disabled tracer (``Tracer(enabled=False)``, or ``tracer=None`` in the engine) costs one
attribute test per span.

GPU: kernels are launched asynchronously, so an interval timed on the host measures launch
time. An enabled tracer therefore synchronizes the device at both ends of every
:meth:`Tracer.span` when the selected device is a GPU (``sync=None``: decided at each span
by :func:`ssmpi.backend.on_device`); the engine synchronizes before it stamps a unit's
compute interval (:class:`ssmpi.engine.executor.Executor`). Tracing on a GPU thus costs two
stream synchronisations per span; a disabled tracer none.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CATEGORY_COLOURS = {"compute": "#4c72b0", "wait": "#dd8452", "data": "#55a868",
                    "update": "#c44e52", "send": "#8172b3", "allreduce": "#937860"}

Event = Tuple[str, str, float, float, int]  # (name, cat, start s, duration s, step)


class Tracer:
    """Collects (name, cat, start, duration, step) intervals of one rank.

    Parameters
    ----------
    rank : this process's rank (the row of the timeline)
    label : shown next to the rank, e.g. ``"U3"`` or ``"stage 1"``
    enabled : False makes every span a no-op
    sync : synchronize the device at span boundaries: None = when the selected device is
        a GPU, or True / False
    """

    def __init__(self, rank: int = 0, label: str = "", enabled: bool = True,
                 sync: Optional[bool] = None):
        self.rank, self.label, self.enabled = int(rank), label, enabled
        self.sync = sync
        self.events: List[Event] = []
        self.step = -1
        self.t_origin = time.perf_counter()

    def set_step(self, step: int):
        """Tag the following spans with ``step`` (a frame step or a micro-batch)."""
        self.step = int(step)

    @contextmanager
    def span(self, name: str, cat: str = "compute"):
        """Time the body as one interval named ``name`` in category ``cat``."""
        if not self.enabled:
            yield
            return
        sync = self._device_sync()
        if sync is not None:
            sync()  # work launched before the span is not the span's
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync is not None:
                sync()  # the span's kernels have run
            self.events.append((name, cat, t0, time.perf_counter() - t0, self.step))

    def _device_sync(self):
        """The device synchronisation to do at span boundaries, or None."""
        from . import backend

        if self.sync is False or (self.sync is None and not backend.on_device()):
            return None
        return backend.synchronize

    def add(self, name: str, cat: str, t0: float, dur: float):
        """Record an interval measured elsewhere (start ``t0`` from ``time.perf_counter``)."""
        if self.enabled:
            self.events.append((name, cat, float(t0), float(dur), self.step))

    def clear(self):
        self.events.clear()

    def totals(self) -> Dict[str, float]:
        """Seconds per category on this rank."""
        out: Dict[str, float] = {}
        for _, cat, _, d, _ in self.events:
            out[cat] = out.get(cat, 0.0) + d
        return out

    # -- output ------------------------------------------------------------------------
    def gather(self, comm=None, root: int = 0) -> Optional[List[dict]]:
        """All ranks' events on ``root`` as dicts (a collective: call it on every rank)."""
        offset = 0.0
        if comm is not None:
            from .engine.transport import as_comm, processor_name

            comm = as_comm(comm)
        if comm is not None and comm.size > 1:
            hosts = comm.allgather(processor_name(), what="the host names of the timeline")
            if len(set(hosts)) > 1:  # different clocks: align on a barrier
                comm.barrier(what="the clock alignment of the timeline")
                mine = time.perf_counter()
                t_root = comm.bcast(mine if comm.rank == root else None, root=root)
                offset = t_root - mine
        rows = [dict(rank=self.rank, label=self.label, name=n, cat=c, t0=t0 + offset, dur=d,
                     step=s) for n, c, t0, d, s in self.events]
        if comm is None:
            return rows
        allrows = comm.gather(rows, root=root, what="the events of the timeline")
        if comm.rank != root:
            return None
        return [r for part in allrows for r in part]

    def dump(self, path, comm=None, root: int = 0, title: str = "",
             png: bool = True) -> Optional[dict]:
        """Gather all ranks' events and write ``path`` (JSON) and ``path`` .png on ``root``.

        A collective: every rank of ``comm`` must call it, outside any step loop. Returns, on
        root, ``{"json": path, "png": path or None, "note": why no PNG, "events": n}``.
        """
        rows = self.gather(comm, root)
        if rows is None:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(chrome_trace(rows, title)))
        out = {"json": str(path), "png": None, "note": "", "events": len(rows)}
        if png:
            pngp = path.with_suffix(".png")
            try:
                gantt_png(rows, pngp, title)
                out["png"] = str(pngp)
            except ImportError as err:
                out["note"] = f"no Gantt PNG: matplotlib is not importable ({err})"
        return out


def chrome_trace(rows: List[dict], title: str = "") -> dict:
    """Chrome trace event format: complete events ("X"), one thread per rank, microseconds."""
    if not rows:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    t_min = min(r["t0"] for r in rows)
    ev = []
    for rank, label in sorted({(r["rank"], r["label"]) for r in rows}):
        name = f"rank {rank}" + (f" ({label})" if label else "")
        ev.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                   "args": {"name": name}})
        ev.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank,
                   "args": {"sort_index": rank}})
    ev.append({"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
               "args": {"name": title or "ssmpi"}})
    for r in rows:
        ev.append({"name": r["name"], "cat": r["cat"], "ph": "X", "pid": 0, "tid": r["rank"],
                   "ts": (r["t0"] - t_min) * 1e6, "dur": r["dur"] * 1e6,
                   "args": {"step": r["step"]}})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def gantt_png(rows: List[dict], path, title: str = "", t_window: Optional[Tuple] = None):
    """A rank x time Gantt chart, one colour per category. Raises ImportError without
    matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_min = min(r["t0"] for r in rows) if rows else 0.0
    ranks = sorted({r["rank"] for r in rows})
    labels = {r["rank"]: r["label"] for r in rows}
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(ranks) + 1.5))
    for cat, colour in list(CATEGORY_COLOURS.items()) + [
            (c, "#999999") for c in sorted({r["cat"] for r in rows}) if c not in
            CATEGORY_COLOURS]:
        for rank in ranks:
            bars = [((r["t0"] - t_min) * 1e3, r["dur"] * 1e3) for r in rows
                    if r["rank"] == rank and r["cat"] == cat]
            if bars:
                ax.broken_barh(bars, (rank - 0.4, 0.8), facecolors=colour)
        ax.bar(0, 0, color=colour, label=cat)  # legend entry
    ax.set_yticks(ranks)
    ax.set_yticklabels([f"rank {r}" + (f" {labels[r]}" if labels[r] else "") for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    if t_window:
        ax.set_xlim(*t_window)
    ax.set_title(title)
    handles, names = ax.get_legend_handles_labels()
    used = {r["cat"] for r in rows}
    keep = [(h, n) for h, n in zip(handles, names) if n in used]
    if keep:
        ax.legend(*zip(*keep), loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def null_span(tracer: Optional[Tracer], name: str, cat: str = "compute"):
    """``tracer.span(name, cat)``, or a no-op context when ``tracer`` is None."""
    if tracer is None:
        return _NULL
    return tracer.span(name, cat)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()


def stacked_gantt_png(panels: List[dict], path, title: str = ""):
    """Several timelines one above the other on one time axis (``python -m
    ssmpi.timelines``). ``panels``: [{"title": str, "rows": trace rows}]; each panel's time
    starts at its own first event, so that schemes are compared from their start. Raises
    ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(1, len({r["rank"] for r in p["rows"]})) + 1 for p in panels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(12, 0.42 * sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights})
    used = set()
    for ax, p in zip(axes[:, 0], panels):
        rows = p["rows"]
        t_min = min(r["t0"] for r in rows) if rows else 0.0
        ranks = sorted({r["rank"] for r in rows})
        labels = {r["rank"]: r["label"] for r in rows}
        cats = sorted({r["cat"] for r in rows})
        used.update(cats)
        for cat in cats:
            colour = CATEGORY_COLOURS.get(cat, "#999999")
            for rank in ranks:
                bars = [((r["t0"] - t_min) * 1e3, r["dur"] * 1e3) for r in rows
                        if r["rank"] == rank and r["cat"] == cat]
                if bars:
                    ax.broken_barh(bars, (rank - 0.4, 0.8), facecolors=colour)
        ax.set_yticks(ranks)
        ax.set_yticklabels([f"rank {r}" + (f" {labels[r]}" if labels[r] else "")
                            for r in ranks], fontsize=8)
        ax.set_ylim(max(ranks, default=0) + 0.6, -0.6)
        ax.set_title(p["title"], fontsize=9, loc="left")
    for cat in sorted(used):
        axes[0, 0].bar(0, 0, color=CATEGORY_COLOURS.get(cat, "#999999"), label=cat)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=len(used))
    axes[-1, 0].set_xlabel("time (ms) from the start of each scheme's first traced iteration")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
