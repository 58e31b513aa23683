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

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional

import numpy as np

EXIT_REQUEUE = 99


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


class Stopper:
    """SIGUSR1 / SIGTERM: finish the current iteration, checkpoint, exit for requeue."""

    def __init__(self):
        self.flag = 0
        self.signame = ""

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = 1
        self.signame = signal.Signals(signum).name


class Setup:
    """Everything built from the config on this rank."""

    def __init__(self, cfg, comm, *, need_engine: bool = True):
        from . import backend, data
        from .engine.topology import Placement, Topology

        self.cfg, self.comm = cfg, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        backend.select(cfg.run.device)
        backend.bind_local_device()
        try:
            self.ds = data.open_dataset(cfg.data.root, cfg.data.train_split, validate=False)
        except data.DataError as e:
            e.collective = True  # every rank reads the same manifest and fails alike
            raise
        self.task = self.ds.task
        hw = (cfg.data.crop, cfg.data.crop) if cfg.data.crop else self.ds.frame_shape[:2]
        if not all(hw):
            raise data.DataError(f"{cfg.data.root}: frame size unknown; set data.crop")
        self.frame_hw = hw
        ncls = cfg.model.num_classes or self.ds.num_classes
        if self.task == "action" and ncls < 2:
            raise data.DataError(f"{cfg.data.root}: the dataset has {ncls} classes")
        self.spec = build_model(cfg, ncls, hw)
        if self.task == "frames" and cfg.engine.schedule == "stream":
            err = data.DataError("engine.schedule = 'stream' supports action recognition only "
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
        self.placement = Placement(self.topo.L, self.size, replicas=e.replicas)
        if e.placement == "balanced" and self.placement.P > 1:
            groups = None
            if self.rank == 0:  # measured once, on one rank; every rank gets the same split
                from .engine.topology import balance_by_cost
                from .engine.unit import measure_unit_costs

                self.unit_costs = measure_unit_costs(self.topo, cfg.data.batch_size,
                                                     dtype=np.dtype(cfg.run.dtype))
                groups = balance_by_cost(self.unit_costs, self.placement.P)
            groups = comm.bcast(groups, root=0)
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

                self.tracer = Tracer(self.rank, label=f"{cfg.engine.mode}", enabled=False)
            o = cfg.optim
            total = cfg.run.iterations * (max(1, cfg.data.clip_len // e.update_every)
                                          if e.schedule == "stream" else 1)
            okw = dict(name=o.name, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay, clip=o.clip, schedule=o.schedule,
                       warmup=o.warmup, total=total, min_lr=o.min_lr,
                       milestones=o.milestones, gamma=o.gamma)
            self.engine = Engine(
                self.topo, self.placement, comm, batch=cfg.data.batch_size, seed=cfg.run.seed,
                dtype=np.dtype(cfg.run.dtype), wait_mode=e.wait_mode, watchdog_s=e.watchdog_s,
                cuda_aware=e.cuda_aware, nonfinite=e.nonfinite, target=cfg.data.target,
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
def evaluate(setup: Setup, split: str, max_batches: int = 0) -> Optional[dict]:
    """Run the pipeline forward only over ``split``; returns the metrics on every rank.

    Each data-parallel replica evaluates its own shards; the results are combined, so every
    video of the split counts once whatever the number of replicas.

    Action recognition: loss, clip accuracy (mean softmax over the valid steps of a clip)
    and video accuracy (mean over a video's clips). Frame prediction: L2 per pixel (mean
    squared error of the predicted frame t+offset), as in Table 7.
    """
    eng, comm, T = setup.engine, setup.comm, setup.cfg.data.clip_len
    loader = setup.loader(split, train=False)
    nb = len(loader)
    if max_batches:
        nb = min(nb, max_batches)
    video_probs, video_label = {}, {}
    clip_correct = clip_count = 0
    losses = []
    try:
        for i, b in enumerate(loader.epoch(0)):
            if i >= nb:
                break
            frames = b.frames if setup.is_bottom else None
            targets = b.frames if (setup.is_top and setup.task == "frames") else None
            st = eng.run_clip(T, frames, b.labels if setup.is_top else None, targets,
                              train=False)
            if setup.is_top:
                mask = b.video >= 0
                if st.losses:
                    losses.append(st.loss)
                if setup.task == "action" and st.probs is not None:
                    pred = st.probs.argmax(1)
                    clip_correct += int((pred[mask] == b.labels[mask]).sum())
                    clip_count += int(mask.sum())
                    for v, p, y in zip(b.video[mask], st.probs[mask], b.labels[mask]):
                        video_probs[int(v)] = video_probs.get(int(v), 0) + p
                        video_label[int(v)] = int(y)
    finally:
        loader.close()
    # every replica evaluated its own shards: combine the top ranks' partial results
    part = None
    if setup.is_top:
        part = dict(correct=clip_correct, count=clip_count, losses=losses,
                    probs=video_probs, labels=video_label)
    parts = [p for p in comm.allgather(part) if p is not None]
    losses = [x for p in parts for x in p["losses"]]
    res = {"split": split, "batches": nb, "replicas": len(parts),
           "loss": float(np.mean(losses)) if losses else None}
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


def _bcast_polling(comm, value: int) -> int:
    """Broadcast an int from rank 0 without busy-waiting (MPICH spins in blocking calls)."""
    from .engine.executor import _wait_polling

    buf = np.array([value], np.int64)
    _wait_polling([comm.Ibcast(buf, root=0)])
    return int(buf[0])


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


def train(cfg, comm, *, resume: bool = False, stopper: Optional[Stopper] = None) -> dict:
    from . import checkpoint as ckpt
    from . import failure

    setup = Setup(cfg, comm)
    eng = setup.engine
    rank = setup.rank
    run_dir = cfg.run_dir()
    # build (and so validate) the data loader before anything is written: a run that fails
    # on bad input must leave an earlier run of the same name untouched
    from .data import DataError

    loader, err = None, None
    try:
        loader = setup.loader(cfg.data.train_split, train=True)
    except DataError as e:  # found by the ranks that read data; every rank must stop alike
        err = str(e)
    found = comm.allgather((err, len(loader) if loader is not None else -1))
    errors = [e for e, _ in found if e]
    if errors:
        if loader is not None:
            loader.close()
        bad = DataError(errors[0])
        bad.collective = True
        raise bad
    T = cfg.data.clip_len
    counts = [n for _, n in found]
    if len(set(counts)) != 1:
        raise RuntimeError(f"ranks disagree on batches per epoch: {counts}")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
        sys.stdout.write(setup.summary() + "\n")
        sys.stdout.flush()
    comm.Barrier()
    start = 0
    if resume:
        path, skipped = ckpt.latest_checkpoint(run_dir)
        if rank == 0:
            for s in skipped:
                failure.warn(f"skipping checkpoint {s}")
        if path is None:
            if rank == 0:
                failure.warn(f"--resume: no complete checkpoint in {run_dir}/checkpoints; "
                             "starting from scratch")
        else:
            man = ckpt.load(path, eng)
            start = int(man["iteration"])
            if rank == 0:
                sys.stdout.write(f"resumed from {path} (iteration {start})\n")
    metrics_f = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
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
    stream = cfg.engine.schedule == "stream"
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
                st = eng._end_clip()
                st.probs = None  # labels change within an iteration: no clip accuracy
                b = b[-1]
            dt = time.perf_counter() - t0
            done_iters += 1
            acc = None
            if setup.is_top and st.probs is not None and b.labels is not None:
                acc = float((st.probs.argmax(1) == b.labels).mean())
            rec = dict(rank=rank, units=eng.local, loss=st.loss if st.losses else None,
                       acc=acc, lr=st.lr, compute_s={l: st.compute_s.get(l, 0.0)
                                                     for l in eng.local},
                       wait_s=st.wait_s, data_wait_s=loader.wait_time - dw0, stop=stopper.flag
                       if stopper else 0)
            log_now = (it + 1) % cfg.run.log_every == 0 or it + 1 == cfg.run.iterations
            allrec = comm.gather(rec, root=0)
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
                    metrics_f.write(json.dumps(m) + "\n")
                    metrics_f.flush()
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.3f}" if loss is not None else "-",
                            "fps": f"{frames_per_it / dt:.0f}"}
                    if last_eval and "clip_acc" in last_eval:
                        post["eval"] = f"{last_eval['clip_acc']:.2f}"
                    bar.set_postfix(post, refresh=False)
            stop = _bcast_polling(comm, stop)
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
                    metrics_f.write(json.dumps(dict(eval=last_eval, iteration=it + 1)) + "\n")
                    metrics_f.flush()
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
    final = evaluate(setup, cfg.data.eval_split, cfg.run.eval_batches)
    summary = dict(final=True, eval=final, iterations=cfg.run.iterations,
                   trained_iterations=done_iters, seconds=round(elapsed, 2),
                   frames_per_s=round(frames_per_it * done_iters / max(elapsed, 1e-9), 2))
    if rank == 0:
        metrics_f.write(json.dumps(summary) + "\n")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ssmpi.train", description=__doc__.split("\n\n")[0],
        epilog="Launch with mpiexec -n <ranks>; see README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config file (default: built-in defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (units, ranks, replicas, shapes, memory) and exit")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint of the run")
    args = ap.parse_args(argv)

    from mpi4py import MPI

    from . import failure
    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config
    from .data import DataError
    from .engine.topology import TopologyError

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    failure.install(comm)
    stopper = Stopper()
    stopper.install()  # first: SLURM may signal right at start-up
    user_errors = (ConfigError, DataError, TopologyError, CheckpointError)
    try:
        cfg = load_config(args.config, args.set)
        _limits = _limit_blas_threads(comm.Get_size())  # noqa: F841 - keep the limit alive
        if args.dry_run:
            setup = Setup(cfg, comm, need_engine=False)
            if rank == 0:
                sys.stdout.write(setup.summary() + "\n")
                sys.stdout.write(setup.topo.describe() + "\n")
                sys.stdout.write(setup.placement.describe() + "\n")
                sys.stdout.write("memory estimate per rank (parameters+optimizer, message "
                                 "buffers, one step's activations):\n")
                for p, m in setup.memory_estimate().items():
                    sys.stdout.write(f"  rank {p} (U{','.join(map(str, m['units']))}): "
                                     f"{_mb(m['total'])} = {_mb(m['params'])} + "
                                     f"{_mb(m['messages'])} + {_mb(m['activations'])}\n")
            return 0
        res = train(cfg, comm, resume=args.resume, stopper=stopper)
        return EXIT_REQUEUE if res.get("stopped") else 0
    except user_errors as e:
        # Deterministic errors happen on every rank alike: exit cleanly with one line.
        # An error on some ranks only would leave the others waiting: abort then.
        msg = f"ssmpi.train: error: {e}"
        if comm.Get_size() == 1:
            sys.stderr.write(msg + "\n")
            return 2
        every = comm.allreduce(1) if comm.Get_size() > 1 and _all_fail_together(e) else 0
        if every == comm.Get_size():
            if rank == 0:
                sys.stderr.write(msg + "\n")
            return 2
        sys.stderr.write(f"{failure.prefix()} {msg}\n")
        sys.stderr.flush()
        failure.abort_job(2)
        return 2


def _all_fail_together(e) -> bool:
    """Errors raised while every rank does the same work (config, topology, manifest)."""
    return getattr(e, "collective", False) or type(e).__name__ in ("ConfigError",
                                                                   "TopologyError")


if __name__ == "__main__":
    sys.exit(main())
