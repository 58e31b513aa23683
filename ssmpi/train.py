"""Train a network with Sideways / Skip-Sideways over MPI: one unit (or a few) per rank.

Launch (every rank runs the same program; the rank decides which units it owns)::

    mpiexec -n 8 python -m ssmpi.train --config jobs/configs/motion_skip.toml
    mpiexec -n 8 python -m ssmpi.train --config ... --set optim.lr=1e-3 --set run.name=try2
    python -m ssmpi.train --config ... --dry-run     # print the plan (units, ranks, memory)
    mpiexec -n 8 python -m ssmpi.train --config ... --resume   # from the newest checkpoint

Outputs in ``<run.out_dir>/<run.name>/``: ``config.toml`` (resolved), ``metrics.jsonl``
(one JSON object per logged iteration and per evaluation), ``checkpoints/``.

Exit codes: 0 done, 2 bad config or input (one line on stderr), 1 other errors (the whole
job is aborted, naming the rank and unit), 99 stopped by SIGUSR1/SIGTERM after writing a
checkpoint (a job script turns this into ``scontrol requeue``).
"""

from __future__ import annotations

from . import program

if __name__ == "__main__":  # before the slow imports: a job may be signalled as it starts
    program.install_signals()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402

from .program import EXIT_REQUEUE, Stopper  # noqa: E402, F401 (Stopper: earlier home)


def _limit_blas_threads(world_size: int):
    """One BLAS thread per rank when ranks share the node's cores (unless the user chose)."""
    if any(v in os.environ for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS")):
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    local = int(os.environ.get("MPI_LOCALNRANKS", os.environ.get("SLURM_NTASKS_PER_NODE",
                                                                   world_size)) or world_size)
    threads = max(1, (os.cpu_count() or 1) // max(1, local))
    return threadpool_limits(threads)


def build_model(cfg, num_classes: int, frame_hw):
    from .nn import models

    spec = _base_model(cfg, num_classes, frame_hw)
    return models.with_input_unit(spec) if cfg.model.input_unit else spec


def _base_model(cfg, num_classes: int, frame_hw):
    from .nn import models

    m = cfg.model
    res = int(frame_hw[0])
    if m.name == "vgg8":
        return models.vgg8(num_classes, width=m.width, resolution=res, s2d=m.s2d)
    if m.name == "vgg16":
        return models.vgg16(num_classes, width=m.width, resolution=res)
    if m.name == "tiny":
        return models.tiny(num_classes, units=m.units, width=max(1, int(m.width)),
                           resolution=res)
    if m.name == "fullres":
        return models.fullres(units=m.units, width=max(1, int(m.width)), resolution=res)
    if m.name == "custom":  # model.arch: the units as text; shapes checked at this frame size
        from .config import ConfigError
        from .nn.architecture import ArchitectureError

        try:
            return models.custom(m.arch, num_classes, resolution=res,
                                 name=m.arch_name or "custom")
        except ArchitectureError as e:
            raise ConfigError(str(e)) from None
    raise ValueError(f"model {m.name!r}")


class Setup:
    """Everything built from the config on this rank."""

    def __init__(self, cfg, comm, *, need_engine: bool = True, need_data: bool = True):
        from pathlib import Path

        from . import backend, data
        from .config import ConfigError, check_unit_lr
        from .engine.topology import Placement, Topology, TopologyError

        self.cfg, self.comm = cfg, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if need_engine:
            backend.select(cfg.run.device)
            backend.bind_local_device()
        self.ds = None
        if need_data or (Path(cfg.data.root) / "manifest.json").is_file():
            try:
                self.ds = data.open_dataset(cfg.data.root, cfg.data.train_split,
                                            validate=False)
            except data.DataError as e:
                e.collective = True  # every rank reads the same manifest and fails alike
                raise
        if self.ds is not None:
            self.task = self.ds.task
            hw = (cfg.data.crop, cfg.data.crop) if cfg.data.crop else self.ds.frame_shape[:2]
            if not all(hw):
                raise data.DataError(f"{cfg.data.root}: frame size unknown; set data.crop")
            ncls = cfg.model.num_classes or self.ds.num_classes
        else:  # planning without the data (a login node): everything from the config
            self.task = "frames" if cfg.model.name == "fullres" else "action"
            hw = (cfg.data.crop, cfg.data.crop)
            ncls = cfg.model.num_classes
            missing = [k for k, v in (("data.crop", cfg.data.crop),
                                      ("model.num_classes", ncls or self.task == "frames"))
                       if not v]
            if missing:
                raise ConfigError(f"{cfg.data.root}: no dataset here; to plan without it set "
                                  f"{' and '.join(missing)} (the frame size and the classes)")
        self.frame_hw = hw
        if self.task == "action" and ncls < 2:
            raise data.DataError(f"{cfg.data.root}: the dataset has {ncls} classes")
        self.spec = build_model(cfg, ncls, hw)
        if self.task == "frames" and cfg.engine.clip_mode == "stream":
            err = data.DataError("engine.clip_mode = 'stream' supports action recognition only "
                                 "(frame prediction trains in reset mode)")
            err.collective = True
            raise err
        want = "frames" if self.task == "frames" else "classify"
        if self.spec.head != want:
            err = data.DataError(f"{cfg.data.root}: task {self.task!r} needs a model with a "
                                 f"{want} head; model.name = {cfg.model.name!r} has "
                                 f"{self.spec.head!r} (use fullres for frame prediction)")
            err.collective = True
            raise err
        e = cfg.engine
        self.topo = Topology(self.spec, mode=e.mode, k=e.k, fuse=e.fuse,
                             modules_per_unit=e.modules_per_unit)
        if e.mode in ("skip", "fa-skip") and e.k > max(2, self.topo.L - 1):  # 2: the default
            raise TopologyError(f"engine.k = {e.k} but the model has {self.topo.L} units: the "
                                f"longest edge is U1->U{self.topo.L} (k <= {self.topo.L - 1})")
        check_unit_lr(cfg, self.topo.L, input_unit=cfg.model.input_unit)
        self.placement = Placement(self.topo.L, self.size, replicas=e.replicas)
        if e.placement == "balanced" and self.placement.P > 1:
            groups = None
            if self.rank == 0:  # measured once, on one rank; every rank gets the same split
                from .engine.topology import balance_by_cost
                from .engine.unit import measure_unit_costs

                self.unit_costs = measure_unit_costs(self.topo, cfg.data.batch_size,
                                                     dtype=np.dtype(cfg.run.dtype))
                groups = balance_by_cost(self.unit_costs, self.placement.P)
            groups = comm.bcast(groups, root=0, what="the balanced placement")
            self.placement = Placement(self.topo.L, self.size, replicas=e.replicas,
                                       groups=groups)
        self.replica = self.placement.replica_of(self.rank)
        self.is_bottom = self.placement.owns_bottom(self.rank)
        self.is_top = self.placement.owns_top(self.rank)
        self.engine = None
        self.tracer = None
        if need_engine:
            from .engine.executor import Engine

            self.tracer = None
            if cfg.run.trace:
                from .trace import Tracer

                self.tracer = Tracer(self.rank, enabled=False, label=",".join(
                    f"U{l}" for l in self.placement.units_of(self.rank)))
            o = cfg.optim
            total = cfg.run.iterations * (max(1, cfg.data.clip_len // e.update_every)
                                          if e.clip_mode == "stream" else 1)
            okw = dict(name=o.name, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay, clip=o.clip, schedule=o.schedule,
                       warmup=o.warmup, total=total, min_lr=o.min_lr,
                       milestones=o.milestones, gamma=o.gamma, amsgrad=o.amsgrad)
            self.engine = Engine(
                self.topo, self.placement, comm, batch=cfg.data.batch_size, seed=cfg.run.seed,
                dtype=np.dtype(cfg.run.dtype), wait_mode=e.wait_mode, watchdog_s=e.watchdog_s,
                cuda_aware=e.cuda_aware, allreduce=e.allreduce, nonfinite=e.nonfinite,
                target=cfg.data.target,
                frame_offset=cfg.data.frame_offset, update_every=e.update_every,
                tracer=self.tracer, optimizer=okw)
            if o.unit_lr != "same":  # per-unit learning rates: one optimizer per local unit
                from .optim import make_optimizer, unit_lr_scale

                for l, u in self.engine.units.items():
                    scale = unit_lr_scale(o.unit_lr, l, self.topo.L)
                    self.engine.opt[l] = make_optimizer(
                        u.theta, **dict(okw, lr=o.lr * scale,
                                        min_lr=o.min_lr * scale))

    def loader(self, split: str, train: bool):
        from . import data

        c = self.cfg.data
        frames_task = self.task == "frames"
        need_frames = self.is_bottom or (frames_task and self.is_top)
        need_labels = self.is_top and not frames_task
        ds = self.ds if split == self.ds.split and (need_frames or need_labels) is False \
            else data.open_dataset(c.root, split, validate=need_frames or need_labels)
        flip = c.flip and train
        gen = str(self.ds.manifest.get("settings", {}).get("generator", ""))
        if flip and gen == "data_prep.synthetic motion":
            # the classes are motion directions: a horizontal flip would change the class
            flip = False
            if self.rank == 0 and not getattr(self, "_flip_warned", False):
                from . import failure

                failure.warn("data.flip ignored: the synthetic motion classes are directions "
                             "of motion, which a horizontal flip would change")
                self._flip_warned = True
        return data.ClipLoader(
            ds, batch_size=c.batch_size, clip_len=c.clip_len, stride=c.stride,
            crop=c.crop or None, train=train, seed=self.cfg.run.seed, replica=self.replica,
            n_replicas=self.placement.replicas, flip=flip,
            scale_jitter=c.scale_jitter or None, mean=c.mean, std=c.std,
            short_policy=c.short_policy, need_frames=need_frames, need_labels=need_labels,
            extra_frames=c.frame_offset if frames_task else 0,
            clips_per_video=1 if train else c.eval_clips_per_video, drop_last=train,
            prefetch=c.prefetch, dtype=np.dtype(self.cfg.run.dtype))

    # -- printouts ----------------------------------------------------------------------
    def summary(self) -> str:
        from .engine.unit import Unit

        topo, pl = self.topo, self.placement
        lines = [f"ssmpi: {self.spec.name}, mode {topo.mode}"
                 + (f", k={topo.k}, fuse {topo.fuse}" if topo.mode in ("skip", "fa-skip")
                    else "")
                 + f"; {self.size} ranks = {pl.replicas} replica(s) x {pl.P} ranks; "
                 f"task {self.task}; batch {self.cfg.data.batch_size} x "
                 f"{self.cfg.data.clip_len} frames of {self.frame_hw[0]}x{self.frame_hw[1]}"]
        lines.append(f"{'unit':>5} {'rank':>4}  {'modules':<44} {'output':>16} {'params':>10} "
                     f"{'MFLOP/frame':>12}")
        total_p = 0
        for l in range(1, topo.L + 1):
            u = Unit.__new__(Unit)  # shapes only: build the layers without parameters
            layers = topo.unit_layers(l)
            shape = topo.in_shapes[l]
            nparam = 0
            flops = 0
            for layer in layers:
                shape = layer.build(shape)
                flops += layer.flops()
                nparam += _param_count(layer)
            del u
            total_p += nparam
            desc = " > ".join(layer.describe() for layer in layers)
            lines.append(f"{'U%d' % l:>5} {pl.rank_of(l):>4}  {desc[:44]:<44} "
                         f"{str(topo.out_shapes[l]):>16} {nparam:>10,} {flops / 1e6:>12.1f}")
        lines.append(f"total parameters: {total_p:,}")
        if self.cfg.optim.unit_lr != "same":
            from .optim import unit_lr_scale

            f = [unit_lr_scale(self.cfg.optim.unit_lr, l, topo.L) for l in range(1, topo.L + 1)]
            lines.append("per-unit learning rates (optim.unit_lr): " + ", ".join(
                f"U{l} " + ("frozen" if x == 0 else f"x{x:.3g}") for l, x in enumerate(f, 1)))
        return "\n".join(lines)

    def memory_estimate(self) -> dict:
        """Rough bytes per rank: parameters + optimizer state + messages + one step's
        activations (residuals), for replica 0."""
        item = np.dtype(self.cfg.run.dtype).itemsize
        N = self.cfg.data.batch_size
        opt_states = 2 if self.cfg.optim.name == "adam" else 1
        out = {}
        for p in range(self.placement.P):
            units = self.placement.units_of(p)
            params = acts = msgs = 0
            for l in units:
                shape = self.topo.in_shapes[l]
                acts += N * int(np.prod(shape)) * item
                for layer in self.topo.unit_layers(l):
                    shape = layer.build(shape)
                    params += _param_count(layer) * item
                    acts += 2 * N * int(np.prod(shape)) * item
                for e in self.topo.edges:
                    if e.dst == l or e.src == l:
                        msgs += 3 * N * int(np.prod(e.act_shape)) * item * (2 if e.grad else 1)
            out[p] = dict(units=units, params=params * (2 + opt_states), messages=msgs,
                          activations=acts, total=params * (2 + opt_states) + msgs + acts)
        return out


def _param_count(layer) -> int:
    if layer.name == "conv":
        return layer.k * layer.k * layer.in_shape[2] * layer.cout + (layer.cout if layer.bias
                                                                     else 0)
    if layer.name == "linear":
        return layer.in_shape[0] * layer.dout + (layer.dout if layer.bias else 0)
    return 0


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- evaluation -------------------------------------------------------------------------
def evaluate(setup: Setup, split: str, max_batches: int = 0, loader=None) -> Optional[dict]:
    """Run the pipeline forward only over ``split``; returns the metrics on every rank.

    Each data-parallel replica evaluates its own shards; the results are combined, so every
    video of the split counts exactly once in every metric, whatever the number of replicas
    and the batch padding (padded slots of a last, partial batch count nowhere).

    Action recognition: loss (mean over clips of the clip's loss averaged over its valid
    steps), clip accuracy (mean softmax over the valid steps of a clip) and video accuracy
    (mean over a video's clips). Frame prediction: L2 per pixel (mean squared error of the
    predicted frame t+offset), as in Table 7.
    """
    eng, comm, T = setup.engine, setup.comm, setup.cfg.data.clip_len
    loader = loader or setup.loader(split, train=False)
    nb = len(loader)
    if max_batches:
        nb = min(nb, max_batches)
    video_probs, video_label = {}, {}
    clip_correct = clip_count = 0
    loss_sum, loss_count = 0.0, 0
    eng.loss.per_sample = True
    try:
        for i, b in enumerate(loader.epoch(0)):
            if i >= nb:
                break
            frames = b.frames if setup.is_bottom else None
            targets = b.frames if (setup.is_top and setup.task == "frames") else None
            st = eng.run_clip(T, frames, b.labels if setup.is_top else None, targets,
                              train=False)
            if setup.is_top:
                mask = b.video >= 0  # padded slots carry video -1
                if st.sample_losses is not None:
                    loss_sum += float(st.sample_losses[mask].sum())
                    loss_count += int(mask.sum())
                if setup.task == "action" and st.probs is not None:
                    pred = st.probs.argmax(1)
                    clip_correct += int((pred[mask] == b.labels[mask]).sum())
                    clip_count += int(mask.sum())
                    for v, p, y in zip(b.video[mask], st.probs[mask], b.labels[mask]):
                        video_probs[int(v)] = video_probs.get(int(v), 0) + p
                        video_label[int(v)] = int(y)
    finally:
        eng.loss.per_sample = False
        loader.close()
    # every replica evaluated its own shards: combine the top ranks' partial results
    part = None
    if setup.is_top:
        part = dict(correct=clip_correct, count=clip_count, loss_sum=loss_sum,
                    loss_count=loss_count, probs=video_probs, labels=video_label)
    parts = [p for p in comm.allgather(part, what=f"the evaluation results on {split!r}")
             if p is not None]
    n = sum(p["loss_count"] for p in parts)
    res = {"split": split, "batches": nb, "replicas": len(parts),
           "loss": sum(p["loss_sum"] for p in parts) / n if n else None}
    if setup.task == "action":
        count = sum(p["count"] for p in parts)
        res["clip_acc"] = sum(p["correct"] for p in parts) / max(count, 1)
        res["clips"] = count
        probs, labels = {}, {}
        for p in parts:
            for v, pr in p["probs"].items():
                probs[v] = probs.get(v, 0) + pr
            labels.update(p["labels"])
        vc = [int(np.argmax(pr) == labels[v]) for v, pr in probs.items()]
        res["video_acc"] = float(np.mean(vc)) if vc else 0.0
        res["videos"] = len(vc)
    else:
        res["l2"] = res["loss"]
    return res


# -- the training loop ------------------------------------------------------------------
def _batches(loader, start_iter: int, n_iter: int):
    """(iteration, epoch, batch) from ``start_iter``: deterministic in (seed, epoch, b)."""
    nb = len(loader)
    if nb == 0:
        from .data import DataError

        raise DataError(f"{loader.dataset.root}: split {loader.dataset.split!r} yields no "
                        f"batch of {loader.batch_size} clips for this replica")
    it = start_iter
    epoch, b0 = divmod(start_iter, nb)
    while it < n_iter:
        if b0:  # resume inside an epoch: build the remaining batches synchronously
            for b in range(b0, nb):
                if it >= n_iter:
                    return
                yield it, epoch, loader.make_batch(epoch, b)
                it += 1
            b0 = 0
        else:
            for batch in loader.epoch(epoch):
                if it >= n_iter:
                    return
                yield it, epoch, batch
                it += 1
        epoch += 1


def _stream_iterations(loader, start_iter: int, n_iter: int, T: int):
    """(iteration, epoch, [T StreamSteps]): the montage stream cut into iterations of T
    steps. Lanes cut between clips at different times (clip lengths T/2..T). A resumed
    stream restarts at the epoch of the checkpoint (not bitwise: stream mode has no clip
    boundary to resume at)."""
    from .data import montage_stream

    nb = max(len(loader), 1)
    stream = montage_stream(loader, min_len=max(1, T // 2), start_epoch=start_iter // nb)
    for it in range(start_iter, n_iter):
        steps = [next(stream) for _ in range(T)]
        yield it, start_iter // nb + (it - start_iter) // nb, steps


def _prepare_run(cfg, comm, setup: Setup, resume: bool, start_over: bool):
    """Rank 0 decides, before anything is written, whether this run may use its folder
    (lock, resume fits the checkpoint); every rank gets the verdict. Returns (lock on rank
    0, checkpoint path or None)."""
    from . import checkpoint as ckpt
    from . import failure
    from .config import Config
    from .rundir import RunDirError, RunLock, read_config, resume_conflicts

    run_dir = cfg.run_dir()
    verdict, lock = None, None
    if comm.rank == 0:
        try:
            lock = RunLock(run_dir).acquire(warn=failure.warn)
            path = None
            if resume:
                path, skipped = ckpt.latest_checkpoint(run_dir)
                if path is None and skipped and not start_over:
                    raise RunDirError(f"--resume: every checkpoint in {run_dir}/checkpoints is "
                                      f"damaged ({'; '.join(skipped)}); add --start-over to "
                                      "train from scratch")
                for why in skipped:
                    failure.warn(f"skipping checkpoint {why}")
                if path is None:
                    why = "every checkpoint is damaged (--start-over)" if skipped else \
                        "no checkpoint"
                    failure.warn(f"--resume: {why} in {run_dir}/checkpoints; training from "
                                 "scratch")
                saved = read_config(run_dir) if path is not None else None
                if saved is not None:
                    conflicts = resume_conflicts(saved, cfg.to_dict(), Config().to_dict())
                    if conflicts:
                        raise RunDirError(f"cannot resume {run_dir} from {path.name}: it was "
                                          f"trained with other values of "
                                          f"{'; '.join(conflicts)}")
            verdict = ("ok", str(path) if path else None)
        except RunDirError as e:
            if lock is not None:
                lock.release()
            verdict = ("error", str(e))
    verdict = comm.bcast(verdict, root=0, what="the verdict on the run folder")
    if verdict[0] == "error":
        raise RunDirError(verdict[1])
    from pathlib import Path

    return lock, (Path(verdict[1]) if verdict[1] else None)


def train(cfg, comm, *, resume: bool = False, start_over: bool = False,
          stopper: Optional[Stopper] = None) -> dict:
    from .data import DataError

    comm = _as_comm(comm, cfg)
    setup = Setup(cfg, comm)
    # build (and so validate) the data loaders of both splits before anything is written:
    # a run that fails on bad input must leave an earlier run of the same name untouched
    loader, eval_loader, err = None, None, None
    try:
        loader = setup.loader(cfg.data.train_split, train=True)
        eval_loader = setup.loader(cfg.data.eval_split, train=False)
    except DataError as e:  # found by the ranks that read data; every rank must stop alike
        err = str(e)
    found = comm.allgather((err, len(loader) if loader is not None else -1),
                           what="the data check of every rank")
    errors = [e for e, _ in found if e]
    if errors:
        for ld in (loader, eval_loader):
            if ld is not None:
                ld.close()
        bad = DataError(errors[0])
        bad.collective = True
        raise bad
    counts = [n for _, n in found]
    if len(set(counts)) != 1:
        raise RuntimeError(f"ranks disagree on batches per epoch: {counts}")
    lock, path = _prepare_run(cfg, comm, setup, resume, start_over)
    try:
        return _train(cfg, comm, setup, loader, eval_loader, path, stopper)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, comm, setup, loader, eval_loader, path, stopper) -> dict:
    from . import checkpoint as ckpt
    from . import failure
    from .engine.losses import DivergenceError
    from .rundir import MetricsLog, set_aside_earlier_run, truncate_metrics, write_config

    eng, rank, run_dir, T = setup.engine, setup.rank, cfg.run_dir(), cfg.data.clip_len
    start = 0
    if path is not None:  # before anything is written: a checkpoint that does not fit
        from .program import agree  # leaves the run folder as it was

        man = agree(comm, lambda: ckpt.load(path, eng), "the checkpoint check of every rank")
        start = int(man["iteration"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if path is None:  # from scratch: an earlier run's checkpoints and curves go apart
            moved = set_aside_earlier_run(run_dir)
            if moved:
                failure.warn(f"{run_dir} held an earlier run: its checkpoints and metrics "
                             f"moved to {moved} (--resume continues a run instead)")
        write_config(run_dir, cfg.to_toml())
        sys.stdout.write(setup.summary() + "\n")
        dropped = truncate_metrics(run_dir / "metrics.jsonl", start)  # no stale lines
        if path is not None:
            sys.stdout.write(f"resumed from {path} (iteration {start})"
                             + (f"; metrics.jsonl: {dropped} lines after it dropped" if dropped
                                else "") + "\n")
        sys.stdout.flush()
    comm.barrier(what="the run folder to be ready")
    metrics_f = MetricsLog(run_dir / "metrics.jsonl") if rank == 0 else None
    bar = None
    if rank == 0 and cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.iterations, initial=start, desc=f"{cfg.engine.mode}",
                   unit="it", dynamic_ncols=True, file=sys.stderr,
                   disable=None if sys.stderr.isatty() else False, mininterval=1.0)
    last_eval = None
    frames_per_it = cfg.data.batch_size * T * setup.placement.replicas
    t_start = time.perf_counter()
    done_iters = 0
    stream = cfg.engine.clip_mode == "stream"
    if stream:
        eng.start_stream()
    step_t = start * T
    it = start
    epoch = 0
    try:
        source = (_stream_iterations(loader, start, cfg.run.iterations, T) if stream
                  else _batches(loader, start, cfg.run.iterations))
        for it, epoch, b in source:
            if setup.tracer is not None:  # the first iteration fills caches: skip it
                setup.tracer.enabled = start + 1 <= it <= start + cfg.run.trace
            t0 = time.perf_counter()
            dw0 = loader.wait_time
            recording = it + 1 == cfg.run.record
            if recording:  # the message log of this iteration: the measured plan
                eng.executor.record = "headers"
            if not stream:
                st = eng.run_clip(T, b.frames if setup.is_bottom else None,
                                  b.labels if setup.is_top else None,
                                  b.frames if (setup.is_top and setup.task == "frames") else None)
            else:  # b: T steps of the montage stream; labels travel with the frame index
                eng.new_interval()
                for s in b:
                    step_t += 1
                    st = eng.stream_step(step_t, s.frames if setup.is_bottom else None,
                                         s.labels if setup.is_top else None)
                st.probs = None  # labels change within an iteration: no clip accuracy
                b = b[-1]
            dt = time.perf_counter() - t0
            comm.watch.observe(dt)  # the watchdog scales with the slowest iteration
            if recording:
                eng.executor.record = False
                _write_measured_grid(setup, run_dir, it + 1, stream)
            done_iters += 1
            if setup.is_top and st.losses and cfg.run.diverge_loss and \
                    st.loss > cfg.run.diverge_loss:  # NaN: engine.nonfinite decides
                last, _ = ckpt.latest_checkpoint(run_dir)
                raise DivergenceError(f"training diverged at iteration {it + 1}: loss "
                                      f"{st.loss:.4g} > run.diverge_loss = "
                                      f"{cfg.run.diverge_loss:g} (lower optim.lr?); the last "
                                      f"good checkpoint: {last or 'none'}")
            acc = None
            if setup.is_top and st.probs is not None and b.labels is not None:
                acc = float((st.probs.argmax(1) == b.labels).mean())
            rec = dict(rank=rank, units=eng.local, loss=st.loss if st.losses else None,
                       acc=acc, lr=st.lr, compute_s={l: st.compute_s.get(l, 0.0)
                                                     for l in eng.local},
                       wait_s=st.wait_s, data_wait_s=loader.wait_time - dw0, stop=stopper.flag
                       if stopper else 0)
            log_now = (it + 1) % cfg.run.log_every == 0 or it + 1 == cfg.run.iterations
            allrec = comm.gather(rec, root=0, what=f"the metrics of iteration {it + 1}")
            stop = 0
            if rank == 0:
                stop = max(r["stop"] for r in allrec)
                tops = [r for r in allrec if setup.topo.L in r["units"]]
                loss = tops[0]["loss"] if tops else None
                tacc = tops[0]["acc"] if tops else None
                if log_now:
                    units = {}
                    for r in allrec:
                        if setup.placement.replica_of(r["rank"]) == 0:
                            for l, c in r["compute_s"].items():
                                units[str(l)] = dict(compute_s=round(c, 5),
                                                     wait_s=round(r["wait_s"], 5))
                    m = dict(iteration=it + 1, epoch=epoch, loss=loss, acc=tacc,
                             lr=max(r["lr"] for r in allrec), step_s=round(dt, 5),
                             frames_per_s=round(frames_per_it / dt, 2),
                             data_wait_s=round(max(r["data_wait_s"] for r in allrec), 5),
                             units=units, time=round(time.perf_counter() - t_start, 3))
                    metrics_f.write(m)
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.3f}" if loss is not None else "-",
                            "fps": f"{frames_per_it / dt:.0f}"}
                    if last_eval and "clip_acc" in last_eval:
                        post["eval"] = f"{last_eval['clip_acc']:.2f}"
                    bar.set_postfix(post, refresh=False)
            stop = comm.bcast(stop, root=0, what=f"the stop flag of iteration {it + 1}")
            if stop:
                ckpt.save(run_dir, eng, comm, iteration=it + 1, epoch=epoch, batch=0,
                          keep=cfg.run.keep_checkpoints)
                if rank == 0:
                    if bar is not None:
                        bar.close()
                    sys.stderr.write(f"ssmpi.train: stopped by signal at iteration {it + 1}; "
                                     f"checkpoint written to {run_dir}/checkpoints; exit "
                                     f"{EXIT_REQUEUE} (requeue)\n")
                return {"stopped": True, "iteration": it + 1}
            if cfg.run.checkpoint_every and (it + 1) % cfg.run.checkpoint_every == 0 \
                    and it + 1 < cfg.run.iterations:
                ckpt.save(run_dir, eng, comm, iteration=it + 1, epoch=epoch, batch=0,
                          keep=cfg.run.keep_checkpoints)
            if cfg.run.eval_every and (it + 1) % cfg.run.eval_every == 0 \
                    and it + 1 < cfg.run.iterations:
                last_eval = evaluate(setup, cfg.data.eval_split, cfg.run.eval_batches)
                if rank == 0:
                    metrics_f.write(dict(eval=last_eval, iteration=it + 1))
                if stream:
                    eng.start_stream()
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    if setup.tracer is not None:
        setup.tracer.enabled = False
        out = setup.tracer.dump(run_dir / "trace.json", comm,
                                title=f"{setup.spec.name} {cfg.engine.mode} on {setup.size} ranks")
        if rank == 0 and out:
            sys.stdout.write(f"timeline: {out['json']} (open in https://ui.perfetto.dev)"
                             + (f", {out['png']}" if out["png"] else f"; {out['note']}") + "\n")
    if start < cfg.run.iterations:
        ckpt.save(run_dir, eng, comm, iteration=cfg.run.iterations, epoch=epoch, batch=0,
                  keep=cfg.run.keep_checkpoints)
    final = evaluate(setup, cfg.data.eval_split, cfg.run.eval_batches, loader=eval_loader)
    summary = dict(final=True, eval=final, iterations=cfg.run.iterations,
                   trained_iterations=done_iters, seconds=round(elapsed, 2),
                   frames_per_s=round(frames_per_it * done_iters / max(elapsed, 1e-9), 2))
    if rank == 0:
        metrics_f.write(summary)
        metrics_f.close()
        e = final or {}
        txt = (f"done: {done_iters} iterations in {elapsed:.1f}s "
               f"({summary['frames_per_s']:.0f} frames/s); {e.get('split')}: ")
        if "clip_acc" in e:
            txt += (f"clip accuracy {e['clip_acc']:.3f}, video accuracy {e['video_acc']:.3f} "
                    f"({e['videos']} videos), loss {e['loss']:.4f}")
        elif e.get("l2") is not None:
            txt += f"L2 per pixel {e['l2']:.5f}"
        sys.stdout.write(txt + "\n")
        sys.stdout.flush()
    return summary


def _write_measured_grid(setup: Setup, run_dir, iteration: int, stream: bool):
    """Gather the records and the message log of one iteration (replica 0) on rank 0 and
    write ``grid.txt``: the measured rank x step grid, and whether it equals the plan."""
    from .engine.plan import render_grid

    eng = setup.engine
    mine = (eng.executor.records, eng.executor.log) if setup.replica == 0 else ([], [])
    eng.executor.records, eng.executor.log = [], []
    parts = setup.comm.gather(mine, root=0, what="the message log of the recorded iteration")
    if setup.rank != 0:
        return
    recs = {(r.l, r.t): r for rs, _ in parts for r in rs}
    log = [m for _, lg in parts for m in lg]
    t0 = min(t for _, t in recs) - 1  # stream mode: steps of the stream; show them from 1
    recs = {(l, t - t0): r for (l, t), r in recs.items()}
    log = [(t - t0, e, k, m) for t, e, k, m in log]
    T = setup.cfg.data.clip_len
    topo, pl = setup.topo, setup.placement
    measured = render_grid(topo, pl, T, T, stream, recs, log,
                           title=f"measured: iteration {iteration} of {run_dir.name}, "
                                 f"{setup.size} ranks ({pl.describe()})")
    text = measured
    if not stream:  # a clip of T frames from a reset: the plan must say the same
        planned = render_grid(topo, pl, T, T, False)
        same = measured.split("\n", 1)[1] == planned.split("\n", 1)[1]
        text += ("\n\nthe measured grid equals the plan (python -m ssmpi.plan)" if same else
                 "\n\nTHE MEASURED GRID DIFFERS FROM THE PLAN:\n\n" + planned)
    (run_dir / "grid.txt").write_text(text + "\n")
    sys.stdout.write(f"message log of iteration {iteration}: {run_dir / 'grid.txt'}\n")


def _as_comm(comm, cfg):
    """The job's communicator with the watchdog and waiting policy of ``cfg``."""
    from .engine.transport import as_comm

    comm = as_comm(comm)
    e = cfg.engine
    comm.watch.configure(e.wait_mode, e.watchdog_s, e.watchdog_factor)
    return comm


def dry_run(cfg, comm) -> int:
    """Print the plan (units, ranks, shapes, memory) from the config; the dataset is read
    only when it is there."""
    setup = Setup(cfg, comm, need_engine=False, need_data=False)
    if setup.rank == 0:
        sys.stdout.write(setup.summary() + "\n")
        sys.stdout.write(setup.topo.describe() + "\n")
        sys.stdout.write(setup.placement.describe() + "\n")
        if setup.ds is None:
            sys.stdout.write(f"(no dataset at {cfg.data.root}: frame size and classes from the "
                             "config)\n")
        sys.stdout.write("memory estimate per rank (parameters+optimizer, message "
                         "buffers, one step's activations):\n")
        for p, m in setup.memory_estimate().items():
            sys.stdout.write(f"  rank {p} (U{','.join(map(str, m['units']))}): "
                             f"{_mb(m['total'])} = {_mb(m['params'])} + "
                             f"{_mb(m['messages'])} + {_mb(m['activations'])}\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ssmpi.train", description=__doc__.split("\n\n")[0],
        epilog="Launch with mpiexec -n <ranks>; see README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config file (default: built-in defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (units, ranks, replicas, shapes, memory) and exit; "
                         "needs no dataset when data.crop and model.num_classes are set")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint of the run")
    ap.add_argument("--start-over", action="store_true",
                    help="with --resume: train from scratch when every checkpoint is damaged")
    args = ap.parse_args(argv)

    def body(comm, stopper):
        from .config import load_config

        cfg = load_config(args.config, args.set)
        _as_comm(comm, cfg)
        _limits = _limit_blas_threads(comm.size)  # noqa: F841 - keep the limit alive
        if args.dry_run:
            return dry_run(cfg, comm)
        res = train(cfg, comm, resume=args.resume, start_over=args.start_over,
                    stopper=stopper)
        return EXIT_REQUEUE if res.get("stopped") else 0

    return program.run("ssmpi.train", body)


if __name__ == "__main__":
    sys.exit(main())
