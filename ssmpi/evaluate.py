"""Evaluate a checkpoint: the pipeline forward only, the same numbers as in training.

    mpiexec -n 8 python -m ssmpi.evaluate --checkpoint runs/demo/checkpoints/ckpt-00000300 \
        --split test
    python -m ssmpi.evaluate --checkpoint runs/demo   # the newest complete checkpoint

The config is the run's resolved ``config.toml`` (next to ``checkpoints/``); ``--set``
overrides it (e.g. ``--set data.root=...``). Any placement works: a checkpoint written by
8 ranks can be evaluated on 1 rank (the serial executor) or 4 (grouped units).
Prints one line and writes the metrics as JSON (``--json``).
"""

from __future__ import annotations

from . import program

if __name__ == "__main__":  # before the slow imports: a job may be signalled as it starts
    program.install_signals()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def resolve(checkpoint: str):
    """(checkpoint folder, run folder) from a checkpoint folder or a run folder."""
    from . import checkpoint as ckpt
    from .checkpoint import CheckpointError

    p = Path(checkpoint)
    if (p / "manifest.json").is_file() or p.name.startswith("ckpt-"):
        return p, p.parent.parent
    if (p / "checkpoints").is_dir():
        latest, skipped = ckpt.latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"{p}: no complete checkpoint ({'; '.join(skipped)})")
        return latest, p
    raise CheckpointError(f"{checkpoint}: neither a checkpoint folder nor a run folder")


def _setup_any_size(cfg, comm, fixed: bool):
    """The run's config on this job's rank count: results do not depend on placement, so
    unless ``engine.replicas`` was set, take the fewest replicas that fit the ranks."""
    from .engine.topology import TopologyError
    from .train import Setup

    if fixed:
        return Setup(cfg, comm)
    size = comm.Get_size()
    last = None
    for r in [d for d in range(1, size + 1) if size % d == 0]:
        cfg.engine.replicas = r
        try:
            return Setup(cfg, comm)
        except TopologyError as e:
            last = e
    raise last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssmpi.evaluate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    ap.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=0, help="limit batches (0 = all)")
    ap.add_argument("--json", default=None, help="also write the metrics to this file")
    args = ap.parse_args(argv)

    def body(comm, stopper):
        from . import checkpoint as ckpt
        from .config import load_config
        from .train import _as_comm, evaluate

        # bad input found by some ranks (data, checkpoint) is one line, printed once, and
        # ends the job before any work
        folder, run_dir = program.agree(comm, lambda: resolve(args.checkpoint),
                                        "the checkpoint to evaluate")
        cfg = load_config(str(run_dir / "config.toml"), ["run.progress=false", *args.set])
        _as_comm(comm, cfg)
        setup = _setup_any_size(cfg, comm, fixed="engine.replicas" in " ".join(args.set))
        split = args.split or cfg.data.eval_split
        loader = program.agree(comm, lambda: setup.loader(split, train=False),
                               "the data check of every rank")
        try:
            program.agree(comm, lambda: ckpt.load(folder, setup.engine),
                          "the checkpoint check of every rank")
        except program.AgreedError:
            loader.close()
            raise
        res = evaluate(setup, split, args.batches, loader=loader)
        if comm.rank == 0:
            res = dict(res or {}, checkpoint=str(folder))
            if "clip_acc" in res:
                line = (f"{split}: clip accuracy {res['clip_acc']:.4f}, video accuracy "
                        f"{res['video_acc']:.4f} ({res['videos']} videos), loss "
                        f"{res['loss']:.4f}")
            else:
                line = f"{split}: L2 per pixel {res.get('l2')}"
            sys.stdout.write(line + "\n")
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0

    return program.run("ssmpi.evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
