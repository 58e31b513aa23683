"""What every lab checker uses: answer files, run folders, traces, verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore

ROOT = Path(__file__).resolve().parents[1]  # the repository


class AnswerError(ValueError):
    """The answer file (or a run folder it names) cannot be read: exit 2."""


class Verdict:
    """What a checker found: ``wrong`` (what is not right yet) and ``notes`` (facts that help,
    never the expected values)."""

    def __init__(self):
        self.wrong: List[str] = []
        self.notes: List[str] = []

    def need(self, ok: bool, message: str) -> bool:
        if not ok:
            self.wrong.append(message)
        return ok

    def note(self, message: str):
        self.notes.append(message)

    @property
    def right(self) -> bool:
        return not self.wrong


def load_answers(path) -> Dict[str, Any]:
    """A TOML answer file as a dict. Raises AnswerError when it is missing or not TOML."""
    p = Path(path)
    if not p.is_file():
        raise AnswerError(f"{p}: no such answer file (make one with python -m labs.check LAB "
                          f"--template > {p})")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise AnswerError(f"{p}: not valid TOML: {e}")


def answered(v: Verdict, ans: Dict[str, Any], key: str, kind=None) -> Optional[Any]:
    """The value of ``key`` if it is filled in (not "?") and of type ``kind``; else None and
    a line in the verdict."""
    if key not in ans:
        v.wrong.append(f"{key}: missing from the answer file")
        return None
    val = ans[key]
    if isinstance(val, str) and val.strip() in ("?", ""):
        v.wrong.append(f"{key}: not answered yet")
        return None
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if not isinstance(val, kinds) or isinstance(val, bool) and bool not in kinds:
            names = " or ".join(k.__name__ for k in kinds)
            v.wrong.append(f"{key}: expected a {names}, got {val!r}")
            return None
    return val


def close(value: float, measured: float, rel: float, absolute: float = 0.0) -> bool:
    """``value`` within ``rel`` (relative) or ``absolute`` of ``measured``."""
    return abs(value - measured) <= max(rel * abs(measured), absolute)


# -- run folders (python -m ssmpi.train writes them) ------------------------------------------
def run_dir(v: Verdict, ans: Dict[str, Any], key: str, base: Path) -> Optional[Path]:
    """The run folder named by ``key`` (relative to ``base``, the answer file's working
    directory), if it holds a finished run."""
    name = answered(v, ans, key, str)
    if name is None:
        return None
    p = Path(name)
    p = p if p.is_absolute() else base / p
    if not (p / "config.toml").is_file():
        v.wrong.append(f"{key}: {name} is not a run folder (no config.toml): run the "
                       "lab's training command first")
        return None
    return p


def run_config(run: Path) -> Dict[str, Any]:
    return tomllib.loads((run / "config.toml").read_text())


def metrics(run: Path) -> List[dict]:
    """The lines of ``metrics.jsonl`` (iterations, evaluations, the final summary)."""
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def final(run: Path) -> Optional[dict]:
    """The final summary line of a finished run (None: it did not finish)."""
    lines = [m for m in metrics(run) if m.get("final")]
    return lines[-1] if lines else None


def trace_rows(run: Path) -> List[dict]:
    """The events of ``trace.json`` (``--set run.trace=N``) as rows: rank, name, cat, t0
    (ms), dur (ms)."""
    f = run / "trace.json"
    if not f.is_file():
        return []
    ev = json.loads(f.read_text())["traceEvents"]
    return [dict(rank=e["tid"], name=e["name"], cat=e.get("cat", ""), t0=e["ts"] / 1e3,
                 dur=e["dur"] / 1e3, step=e.get("args", {}).get("step")) for e in ev
            if e.get("ph") == "X"]


def per_rank_ms(rows: List[dict], cat: str) -> Dict[int, float]:
    """{rank: milliseconds in category ``cat``} (every rank of the trace, 0 when none)."""
    out = {r["rank"]: 0.0 for r in rows}
    for r in rows:
        if r["cat"] == cat:
            out[r["rank"]] += r["dur"]
    return out


def differences(a: Dict[str, Any], b: Dict[str, Any], ignore=()) -> List[str]:
    """Dotted keys whose values differ between two config dicts (``ignore``: dotted keys)."""
    out = []
    for sec in sorted(set(a) | set(b)):
        x, y = a.get(sec), b.get(sec)
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                key = f"{sec}.{k}"
                if key not in ignore and x.get(k) != y.get(k):
                    out.append(key)
        elif sec not in ignore and x != y:
            out.append(sec)
    return out
