"""One configuration tree: dataclasses with a comment on every default, TOML files,
``--set a.b=c`` overrides and validation that names the key and the allowed values.

    cfg = load_config("jobs/configs/hmdb51_vgg8_skip.toml", ["optim.lr=5e-4", "engine.k=3"])
    cfg.engine.mode, cfg.optim.lr
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from .optim import UNIT_LR_RULES  # optim.unit_lr, besides a list of per-unit factors

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range."""


@dataclass
class RunConfig:
    name: str = "run"  # run name; outputs go to <out_dir>/<name>/
    out_dir: str = "runs"  # parent folder of run folders
    seed: int = 0  # seeds parameters, data order, crops and dropout
    iterations: int = 100  # training iterations: batches of clips (stream: T steps each)
    log_every: int = 1  # iterations between metrics lines in metrics.jsonl
    eval_every: int = 0  # iterations between evaluations (0 = only at the end)
    eval_batches: int = 0  # batches per evaluation (0 = the whole eval split)
    checkpoint_every: int = 0  # iterations between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # newest complete checkpoints kept on disk
    device: str = "auto"  # auto | cpu | gpu | double (auto = $SSMPI_DEVICE if set, else CuPy
    #                       when it sees a GPU; double = the device-array double, for tests)
    dtype: str = "float32"  # float32 | float64
    progress: bool = True  # tqdm progress bar on rank 0
    trace: int = 0  # trace this many iterations (after the first) -> <run>/trace.json + .png
    diverge_loss: float = 1e4  # a training loss above this ends the run as diverged (0 = never)
    record: int = 0  # record the messages of this iteration (1-based) -> <run>/grid.txt: the
    #                  measured rank x step grid, checked against the plan (0 = off)


@dataclass
class ModelConfig:
    name: str = "vgg8"  # vgg8 | vgg16 | tiny | fullres (frame prediction) | custom (model.arch)
    width: float = 1.0  # channel multiplier (vgg8/vgg16); channels of the first conv (tiny)
    units: int = 8  # tiny, fullres: number of modules (conv modules + the head)
    num_classes: int = 0  # 0 = from the dataset
    s2d: bool = False  # vgg8: space-to-depth stem (Table 5)
    input_unit: bool = False  # prepend a parameter-free identity unit: the shortcut U1->U3
    #                           then carries the input frame (docs/FINDINGS.md)
    arch: List[List[str]] = field(default_factory=list)  # custom: units, each a list of
    #   layers, e.g. [["conv 16", "relu", "maxpool 2"], ["gap", "linear classes"]]
    #   (syntax: ssmpi/nn/architecture.py); the resolved config.toml always holds it
    arch_file: str = ""  # custom: read model.arch from this file (jobs/archs/*.toml); it is
    #   copied into model.arch when the config is loaded (and this key cleared)
    arch_name: str = ""  # custom: the model's name (default: the arch file's name or "custom")


@dataclass
class EngineConfig:
    mode: str = "skip"  # bp | sideways | skip | fa-skip
    k: int = 2  # largest edge distance for skip (the paper uses 2)
    fuse: str = "concat"  # concat | add (equation 1)
    modules_per_unit: int = 1  # group consecutive modules into units (VGG16 on 8 ranks: 2)
    replicas: int = 1  # data-parallel replicas of the pipeline (world size = replicas x ranks)
    placement: str = "contiguous"  # contiguous groups | balanced (by measured unit step times)
    clip_mode: str = "reset"  # reset (zero the pipeline, one update per clip: the paper) |
    #                           stream (a montage of clips, no resets, real-time learning)
    update_every: int = 16  # stream mode: steps between each unit's updates
    wait_mode: str = "poll"  # poll (test + sleep: yields the core) | block (spin on the test)
    watchdog_s: float = 60.0  # a wait that makes no progress this long (and at least
    #                           watchdog_factor x the slowest iteration) ends the job, naming
    #                           the ranks that stopped answering (0 = off)
    watchdog_factor: float = 20.0  # the watchdog grows with the slowest iteration seen
    cuda_aware: bool = False  # hand device buffers to MPI directly (needs a CUDA-aware MPI)
    allreduce: str = "auto"  # replicas' gradient sum on a GPU: host (staged through page-locked
    #                          buffers) | cuda_aware (device buffers to MPI) | nccl (one GPU per
    #                          rank) | auto (cuda_aware if engine.cuda_aware, else host)
    nonfinite: str = "raise"  # raise | skip: what a NaN/Inf loss or gradient does


@dataclass
class DataConfig:
    root: str = "data/motion"  # folder with manifest.json and shards (python -m data_prep ...)
    train_split: str = "train"  # split trained on
    eval_split: str = "test"  # split evaluated on
    batch_size: int = 8  # clips per batch, per replica
    clip_len: int = 16  # T: frames per clip (steps per iteration in reset mode)
    stride: int = 1  # temporal stride (frame-rate subsampling)
    crop: int = 0  # crop size (0 = keep the stored size); random in training, centred in eval
    flip: bool = True  # random horizontal flip in training
    scale_jitter: List[float] = field(default_factory=list)  # [lo, hi] or [] for none
    mean: float = 0.5  # normalisation (x/255 - mean) / std
    std: float = 0.25
    short_policy: str = "loop"  # a video shorter than a clip: loop | pad | skip | error
    eval_clips_per_video: int = 1  # clips per video in evaluation (video accuracy averages them)
    prefetch: int = 2  # batches prepared ahead by the reader thread
    frame_offset: int = 8  # frame prediction: the target is frame t + offset
    target: str = "newest"  # frame prediction: offset from the newest frame or the direct-path one


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 5e-4  # peak learning rate
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0  # L2 (sgd) or decoupled (adam)
    amsgrad: bool = False  # adam: divide by the largest second moment seen (Reddi et al. 2018),
    #   so a step cannot grow after a run of tiny gradients (docs/FINDINGS.md, section 9e)
    clip: float = 0.0  # per-unit gradient-norm clipping (0 = off)
    schedule: str = "constant"  # constant | step | cosine
    warmup: int = 0  # linear warm-up updates
    min_lr: float = 0.0  # cosine floor
    milestones: List[int] = field(default_factory=list)  # step schedule: updates where lr *= gamma
    gamma: float = 0.1  # step schedule factor
    unit_lr: Union[str, List[float]] = "same"  # same | stale: unit U_l's lr x 1/(1 + 2(L-l)),
    #   the age of its cotangent; keeps a found solution at a constant lr (docs/FINDINGS.md,
    #   section 10) | one factor per unit, [U1, ..., UL], 0 freezing a unit (section 9d)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    about: str = ""  # free text: what this config reproduces

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


CHOICES = {
    "run.device": ("auto", "cpu", "gpu", "double"),
    "engine.allreduce": ("auto", "host", "cuda_aware", "nccl"),
    "run.dtype": ("float32", "float64"),
    "model.name": ("vgg8", "vgg16", "tiny", "fullres", "custom"),
    "engine.mode": ("bp", "sideways", "skip", "fa-skip"),
    "engine.fuse": ("concat", "add"),
    "engine.clip_mode": ("reset", "stream"),
    "engine.placement": ("contiguous", "balanced"),
    "engine.wait_mode": ("poll", "block"),
    "engine.nonfinite": ("raise", "skip"),
    "data.short_policy": ("loop", "pad", "skip", "error"),
    "data.target": ("newest", "direct"),
    "optim.name": ("adam", "sgd"),
    "optim.schedule": ("constant", "step", "cosine"),
}
POSITIVE = {"run.iterations", "run.log_every", "engine.k", "engine.modules_per_unit",
            "engine.replicas", "engine.update_every", "data.batch_size", "data.clip_len",
            "data.stride", "data.eval_clips_per_video", "data.prefetch", "run.keep_checkpoints"}
NON_NEGATIVE = {"run.trace", "run.eval_every", "run.eval_batches", "run.checkpoint_every",
                "engine.watchdog_s", "engine.watchdog_factor", "run.diverge_loss", "run.record",
                "data.crop", "data.frame_offset", "optim.lr", "optim.weight_decay", "optim.clip",
                "optim.warmup", "optim.min_lr", "model.num_classes", "optim.momentum"}


def _sections(cfg: Config):
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            yield f.name, v


def _coerce_arch(key: str, value: Any) -> list:
    """model.arch: a list of units, each a list of layer strings (TOML, or JSON in --set)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"config key {key}: expected a list of units such as "
                              f"[[\"conv 16\", \"relu\"], [\"gap\", \"linear classes\"]], got "
                              f"{value!r}") from None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(u, (list, tuple)) and all(isinstance(x, str) for x in u) for u in value):
        raise ConfigError(f"config key {key}: expected a list of units, each a list of layer "
                          f"strings, got {value!r}")
    return [list(u) for u in value]


def _coerce_unit_lr(key: str, value: Any):
    """optim.unit_lr: a rule name, or one factor per unit (a TOML list, or in --set
    ``[0,0,1,1]`` or ``0,0,1,1``)."""
    if isinstance(value, str) and not (value.strip().startswith("[") or "," in value):
        return value.strip()
    given = value
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            value = None
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise ConfigError(f"config key {key}: expected {' or '.join(UNIT_LR_RULES)}, or one "
                      f"learning-rate factor per unit such as [0, 0, 1, 1], got {given!r}")


def _coerce(key: str, value: Any, default: Any):
    """Convert ``value`` to the type of ``default`` or raise ConfigError naming ``key``."""
    if key == "model.arch":
        return _coerce_arch(key, value)
    if key == "optim.unit_lr":
        return _coerce_unit_lr(key, value)
    want = type(default)
    try:
        if want is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if want is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if want is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if want is list:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [
                    v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            conv = int if key == "optim.milestones" else float
            return [conv(v) for v in value]
        if want is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    raise ConfigError(f"config key {key}: expected {want.__name__}, got {value!r}")


# earlier names of config keys: still accepted, with one deprecation line each
RENAMED = {"engine.schedule": "engine.clip_mode"}
_warned = set()


def _renamed(sec: str, key: str) -> tuple:
    new = RENAMED.get(f"{sec}.{key}")
    if new is None:
        return sec, key
    if new not in _warned:
        import os
        import sys

        _warned.add(new)
        rank = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
                     if v in os.environ), "0")
        if rank == "0":  # one line per job, not one per rank
            sys.stderr.write(f"ssmpi: config key {sec}.{key} is deprecated: use {new}\n")
    return tuple(new.split("."))


def _apply(cfg: Config, data: dict, origin: str):
    sections = dict(_sections(cfg))
    data = _rename_keys(data)
    for sec, body in data.items():
        if sec == "about":
            cfg.about = str(body)
            continue
        if sec not in sections:
            raise ConfigError(f"{origin}: unknown config section [{sec}] (known: "
                              f"{', '.join(sorted(sections))})")
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: [{sec}] must be a table")
        obj = sections[sec]
        names = {f.name for f in dataclasses.fields(obj)}
        for k, v in body.items():
            if k not in names:
                raise ConfigError(f"{origin}: unknown config key {sec}.{k} (known in [{sec}]: "
                                  f"{', '.join(sorted(names))})")
            setattr(obj, k, _coerce(f"{sec}.{k}", v, getattr(obj, k)))


def _rename_keys(data: dict) -> dict:
    out = {}
    for sec, body in data.items():
        if not isinstance(body, dict):
            out[sec] = body
            continue
        for k, v in body.items():
            s2, k2 = _renamed(sec, k)
            out.setdefault(s2, {})[k2] = v
    return out


def parse_override(text: str) -> dict:
    """``"optim.lr=1e-3"`` -> ``{"optim": {"lr": "1e-3"}}``."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. optim.lr=1e-3")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.name, e.g. optim.lr")
    return {parts[0]: {parts[1]: value.strip()}}


def validate(cfg: Config) -> Config:
    """Check ranges and choices; raise ConfigError naming the key and what is allowed."""
    for sec, obj in _sections(cfg):
        for f in dataclasses.fields(obj):
            key, v = f"{sec}.{f.name}", getattr(obj, f.name)
            if key in CHOICES and v not in CHOICES[key]:
                raise ConfigError(f"config key {key}: {v!r} is not one of "
                                  f"{', '.join(CHOICES[key])}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key {key}: must be a finite number, got {v}")
            if key in POSITIVE and not v >= 1:
                raise ConfigError(f"config key {key}: must be >= 1, got {v}")
            if key in NON_NEGATIVE and not v >= 0:
                raise ConfigError(f"config key {key}: must be >= 0, got {v}")
    if cfg.model.width <= 0:
        raise ConfigError(f"config key model.width: must be > 0, got {cfg.model.width}")
    if cfg.model.units < 2:
        raise ConfigError(f"config key model.units: must be >= 2, got {cfg.model.units}")
    _validate_arch(cfg.model)
    _validate_unit_lr(cfg.optim.unit_lr)
    if cfg.optim.amsgrad and cfg.optim.name != "adam":
        raise ConfigError(f"config key optim.amsgrad: an Adam option (optim.name is "
                          f"{cfg.optim.name!r})")
    if cfg.optim.momentum >= 1:
        raise ConfigError(f"config key optim.momentum: must be in [0, 1), got "
                          f"{cfg.optim.momentum}")
    if cfg.data.std <= 0:
        raise ConfigError(f"config key data.std: must be > 0, got {cfg.data.std}")
    if cfg.data.scale_jitter and (len(cfg.data.scale_jitter) != 2
                                  or not 0 < cfg.data.scale_jitter[0] <= cfg.data.scale_jitter[1]):
        raise ConfigError("config key data.scale_jitter: expected [] or [lo, hi] with 0 < lo <= "
                          f"hi, got {cfg.data.scale_jitter}")
    if cfg.optim.schedule == "cosine" and cfg.run.iterations <= cfg.optim.warmup:
        raise ConfigError("config key optim.warmup: must be < run.iterations for cosine")
    if cfg.engine.mode in ("skip", "fa-skip") and cfg.engine.k < 2:
        raise ConfigError(f"config key engine.k: mode {cfg.engine.mode} needs k >= 2")
    if "/" in cfg.run.name or not cfg.run.name.strip():
        raise ConfigError(f"config key run.name: must be a plain folder name, got "
                          f"{cfg.run.name!r}")
    return cfg


def _validate_unit_lr(u):
    """optim.unit_lr: a known rule, or factors >= 0 of which one at least is > 0 (the number
    of units is checked when the model is built: see :func:`check_unit_lr`)."""
    if isinstance(u, str):
        if u not in UNIT_LR_RULES:
            raise ConfigError(f"config key optim.unit_lr: {u!r} is not one of "
                              f"{', '.join(UNIT_LR_RULES)} (or one factor per unit, such as "
                              "[0, 0, 1, 1])")
        return
    if len(u) < 2 or not all(math.isfinite(f) and f >= 0 for f in u):
        raise ConfigError(f"config key optim.unit_lr: expected one factor >= 0 per unit "
                          f"(U1 first), got {u}")
    if max(u) == 0:
        raise ConfigError(f"config key optim.unit_lr: every factor is 0, so no unit would "
                          f"train ({u})")


def check_unit_lr(cfg: Config, L: int, input_unit: bool = False):
    """optim.unit_lr as a list must have one factor per unit of the built model."""
    u = cfg.optim.unit_lr
    if isinstance(u, list) and len(u) != L:
        extra = ", the input unit U1 included" if input_unit else ""
        raise ConfigError(f"config key optim.unit_lr: {len(u)} factors for a model of {L} "
                          f"units (U1..U{L}{extra}); give one per unit, e.g. "
                          f"{[0.0] + [1.0] * (L - 1)}")


def _validate_arch(m: ModelConfig):
    """model.name = custom <=> model.arch; the layer texts are well formed (shapes are
    checked when the model is built, at the data's frame size)."""
    from .nn.architecture import ArchitectureError, parse_units

    if m.arch_file:
        raise ConfigError("config key model.arch_file: not resolved (load configs with "
                          "load_config or config_from_dict)")
    if m.name == "custom" and not m.arch:
        raise ConfigError("config key model.arch: model.name = 'custom' needs the units, in "
                          "model.arch or model.arch_file (e.g. jobs/archs/probe.toml)")
    if m.arch and m.name != "custom":
        raise ConfigError(f"config key model.name: model.arch (or model.arch_file) is set, so "
                          f"model.name must be 'custom' (got {m.name!r})")
    if m.arch:
        try:
            parse_units(m.arch, origin="model.arch")
        except ArchitectureError as e:
            raise ConfigError(str(e)) from None


def _resolve_arch_file(cfg: Config, config_path: Optional[str]):
    """Copy the architecture file named by model.arch_file into model.arch (so that the
    resolved config alone describes the model) and clear model.arch_file. A relative path is
    looked up from the working directory, then from the config file's folder and the two
    above it (so "jobs/archs/x.toml" in jobs/configs/*.toml works from anywhere)."""
    from .nn.architecture import ArchitectureError, load_arch_file

    m = cfg.model
    if not m.arch_file:
        return
    if m.arch:
        raise ConfigError("config keys model.arch and model.arch_file are both set: give one "
                          "(set the other to [] or \"\")")
    p = Path(m.arch_file)
    if not p.is_absolute() and not p.is_file() and config_path:
        here = Path(config_path).resolve().parent
        p = next((d / p for d in [here, *here.parents][:3] if (d / p).is_file()), p)
    try:
        d = load_arch_file(p)
    except ArchitectureError as e:
        raise ConfigError(f"config key model.arch_file: {e}") from None
    m.arch, m.arch_file = [list(u) for u in d["units"]], ""
    m.arch_name = m.arch_name or d["name"]


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file (if any), then ``--set`` overrides; validated.
    ``model.arch_file`` is read here and copied into ``model.arch``."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
        _apply(cfg, data, str(path))
    for o in overrides:
        _apply(cfg, parse_override(o), f"--set {o}")
    _resolve_arch_file(cfg, path)
    return validate(cfg)


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d, "dict")
    _resolve_arch_file(cfg, None)
    return validate(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def dump_toml(d: dict) -> str:
    """A TOML text of a two-level config dict (what the resolved config is saved as)."""
    lines = []
    if d.get("about"):
        lines.append(f"about = {_toml_value(d['about'])}")
    for sec, body in d.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{sec}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines).lstrip() + "\n"
