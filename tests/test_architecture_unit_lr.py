"""optim.unit_lr (issue 16, keeping what Skip-Sideways learns): ``"stale"`` trains unit U_l
of L with lr / (1 + 2(L - l)); a list gives one factor per unit, 0 freezing a unit. Checked
on the trainer's first Adam step, whose size is the learning rate itself."""

import numpy as np
import pytest
from train_helpers import base_args, make_motion, program_lines, run_train

from ssmpi import checkpoint as ckpt
from ssmpi.config import ConfigError, load_config
from ssmpi.optim import unit_lr_scale


def test_scales():
    assert [unit_lr_scale("stale", l, 4) for l in (1, 2, 3, 4)] == [1 / 7, 1 / 5, 1 / 3, 1]
    assert unit_lr_scale("same", 1, 8) == 1.0
    assert [unit_lr_scale([0, 0.5, 1, 2], l, 4) for l in (1, 2, 3, 4)] == [0, 0.5, 1, 2]
    with pytest.raises(ValueError, match="not one of same, stale"):
        unit_lr_scale("fresh", 1, 2)
    with pytest.raises(ValueError, match="3 unit lr factors for 4 units"):
        unit_lr_scale([0, 1, 1], 1, 4)
    with pytest.raises(ConfigError, match="optim.unit_lr: 'fresh' is not one of same, stale"):
        load_config(None, ["optim.unit_lr=fresh"])


@pytest.mark.parametrize("text", ["[0,0,1,1]", "0,0,1,1", "[0, 0.0, 1, 1.0]"])
def test_factor_lists_parse(text):
    assert load_config(None, [f"optim.unit_lr={text}"]).optim.unit_lr == [0, 0, 1, 1]


def test_factor_lists_from_toml_and_back(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[optim]\nunit_lr = [0, 0, 1, 1]\n")
    cfg = load_config(str(p))
    assert cfg.optim.unit_lr == [0, 0, 1, 1]
    (tmp_path / "resolved.toml").write_text(cfg.to_toml())  # what a run folder keeps
    assert load_config(str(tmp_path / "resolved.toml")).optim.unit_lr == [0, 0, 1, 1]


@pytest.mark.parametrize("text,msg", [
    ("[1,-1]", "one factor >= 0 per unit"),
    ("[1,NaN]", "one factor >= 0 per unit"),
    ("[1]", "one factor >= 0 per unit"),
    ("[0,0,0]", "every factor is 0, so no unit would train"),
    ("[1,true]", "one learning-rate factor per unit such as"),
    ("[a,b]", "one learning-rate factor per unit such as"),
    ("0.5", "'0.5' is not one of same, stale"),
])
def test_bad_factor_lists(text, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [f"optim.unit_lr={text}"])


@pytest.mark.timeout(300)
def test_trainer_applies_the_rules(tmp_path):
    motion = make_motion(tmp_path / "m")
    one = ["--set", "run.iterations=1", "--set", "data.flip=false"]
    factors = [0, 0.5, 0, 1]  # U1 and U3 frozen, U2 at half the lr
    runs = {"init": ["--set", "optim.lr=0"], "same": [],
            "stale": ["--set", "optim.unit_lr=stale"],
            "list": ["--set", f"optim.unit_lr={factors}".replace(" ", "")]}
    params = {}
    for name, extra in runs.items():
        p = run_train(2, base_args(motion, tmp_path, name, *one, *extra))
        assert p.returncode == 0, p.stderr[-3000:]
        params[name] = ckpt.read_parameters(ckpt.latest_checkpoint(tmp_path / name)[0])
    lr, L = 1e-3, 4
    for l in range(1, L + 1):
        for k, w0 in params["init"][l].items():
            # Adam's first step moves every parameter with a gradient by lr (m / sqrt(v) = 1)
            same = np.abs(params["same"][l][k] - w0).max()
            stale = np.abs(params["stale"][l][k] - w0).max()
            listed = np.abs(params["list"][l][k] - w0).max()
            assert same == pytest.approx(lr, rel=1e-3), (l, k)
            assert stale == pytest.approx(lr / (1 + 2 * (L - l)), rel=1e-3), (l, k)
            if factors[l - 1] == 0:
                assert listed == 0, (l, k)  # frozen: bit for bit the initial weights
            else:
                assert listed == pytest.approx(lr * factors[l - 1], rel=1e-3), (l, k)
    # the run folder's resolved config keeps the list, so --resume trains the same units
    assert load_config(str(tmp_path / "list" / "config.toml")).optim.unit_lr == factors


@pytest.mark.timeout(120)
def test_factor_count_must_match_the_model(tmp_path):
    motion = make_motion(tmp_path / "m")
    p = run_train(2, base_args(motion, tmp_path, "bad", "--set", "optim.unit_lr=[0,1,1]"))
    lines = program_lines(p.stderr)
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1, lines
    assert "optim.unit_lr: 3 factors for a model of 4 units (U1..U4)" in lines[0]
    assert not (tmp_path / "bad").exists()  # nothing written for a config that cannot run
    # the input unit is a unit: 4 factors no longer fit, and the error says why
    p = run_train(2, base_args(motion, tmp_path, "bad2", "--set", "optim.unit_lr=[0,0,1,1]",
                               "--set", "model.input_unit=true"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "4 factors for a model of 5 units (U1..U5, the input unit U1 included)" in p.stderr


@pytest.mark.timeout(300)
def test_run_sh_runs_the_frozen_flat_config(tmp_path):
    """README: ``RANKS=4 CONFIG=jobs/configs/motion32_flat_freeze.toml ... ./run.sh`` (the
    setting without the input unit) trains both modes and names the frozen units."""
    import os
    import subprocess
    from pathlib import Path

    from train_helpers import ENV

    root = Path(__file__).resolve().parents[1]
    data_args = ("--size 32 --classes 4 --speeds 2 --square 8 --noise 0.02 --frames 10 "
                 "--videos 32 --test-videos 16 --background flat")
    env = dict(ENV, RANKS="4", CONFIG="jobs/configs/motion32_flat_freeze.toml",
               DATA=str(tmp_path / "data"), OUT=str(tmp_path / "runs"), DATA_ARGS=data_args,
               MPLBACKEND="Agg")
    p = subprocess.run(["./run.sh", "--set", "run.iterations=3", "--set", "run.eval_every=0",
                        "--set", "run.eval_batches=1", "--set", "run.progress=false"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "chance is 25% (4 classes)" in p.stdout
    assert "(here with the bottom units frozen by optim.unit_lr)" in p.stdout
    assert "U1 frozen, U2 frozen, U3 x1, U4 x1" in p.stdout + p.stderr
    for mode in ("sideways", "skip"):
        assert os.path.isfile(tmp_path / "runs" / f"demo-{mode}" / "metrics.jsonl")


def test_amsgrad_is_an_adam_option():
    assert load_config(None, ["optim.amsgrad=true"]).optim.amsgrad is True
    with pytest.raises(ConfigError, match="optim.amsgrad: an Adam option"):
        load_config(None, ["optim.amsgrad=true", "optim.name=sgd"])


@pytest.mark.timeout(200)
def test_trainer_passes_amsgrad_to_every_unit(tmp_path):
    """optim.amsgrad = true reaches each unit's Adam, with the per-unit factors too: the
    checkpoint keeps its running maximum of the second moment (vmax >= v); without it there
    is none."""
    import h5py

    motion = make_motion(tmp_path / "m")
    runs = {"a": ["--set", "optim.amsgrad=true"],
            "b": ["--set", "optim.amsgrad=true", "--set", "optim.unit_lr=1,1,0.5,1"],
            "off": ["--set", "optim.unit_lr=1,1,0.5,1"]}
    for name, extra in runs.items():
        p = run_train(2, base_args(motion, tmp_path, name, "--set", "run.iterations=2",
                                   *extra))
        assert p.returncode == 0, p.stderr[-3000:]
        folder = ckpt.latest_checkpoint(tmp_path / name)[0]
        for l in range(1, 5):
            with h5py.File(folder / f"unit-{l:02d}.h5") as f:
                if name == "off":
                    assert "vmax" not in f["optim"], l
                    continue
                v, vmax = f["optim/v"][()], f["optim/vmax"][()]
            assert (v > 0).any() and (vmax >= v).all(), (name, l)
