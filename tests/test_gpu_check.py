"""The prepared GPU check's pieces that can run here (the whole script: ``--dry``, minutes)."""

import json
import subprocess
import sys
from pathlib import Path

from train_helpers import ENV

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py")]


def test_scripts_parse():
    for s in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / s)], check=True, timeout=30)


def _metrics(path, losses):
    path.write_text("".join(json.dumps({"iteration": i + 1, "loss": v}) + "\n"
                            for i, v in enumerate(losses)) + json.dumps({"eval": {}}) + "\n")
    return str(path)


def test_losses_verdict(tmp_path):
    a = _metrics(tmp_path / "a.jsonl", [1.0, 0.9, 0.8])
    b = _metrics(tmp_path / "b.jsonl", [1.0, 0.90001, 0.8])
    c = _metrics(tmp_path / "c.jsonl", [1.0, 0.9, 0.7])
    for other, agree in ((b, True), (c, False)):
        out = tmp_path / "r.json"
        subprocess.run(BENCH + ["losses", a, other, "--n", "3", "--rtol", "1e-4", "--out",
                                str(out)], check=True, timeout=60, env=ENV)
        r = json.loads(out.read_text())
        assert r["agree"] is agree and r["iterations_compared"] == 3
    assert r["first_over"] == 3


def test_conv_bench_runs_on_the_double(tmp_path):
    out = tmp_path / "conv.json"
    subprocess.run(BENCH + ["conv", "--device", "double", "--width", "0.03", "--res", "8",
                            "--batch", "1", "--repeat", "1", "--out", str(out)], check=True,
                   timeout=120, env=dict(ENV, PYTHONPATH=str(ROOT)))
    r = json.loads(out.read_text())
    assert len(r["layers"]) == 7 and r["ssmpi_best_ms"] > 0
