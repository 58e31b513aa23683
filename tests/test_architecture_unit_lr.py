"""optim.unit_lr = "stale" (issue 16, keeping what Skip-Sideways learns): unit U_l of L
trains with lr / (1 + 2(L - l)); checked on the trainer's first Adam step, whose size is the
learning rate itself."""

import numpy as np
import pytest
from train_helpers import base_args, make_motion, run_train

from ssmpi import checkpoint as ckpt
from ssmpi.config import ConfigError, load_config
from ssmpi.optim import unit_lr_scale


def test_scales():
    assert [unit_lr_scale("stale", l, 4) for l in (1, 2, 3, 4)] == [1 / 7, 1 / 5, 1 / 3, 1]
    assert unit_lr_scale("same", 1, 8) == 1.0
    with pytest.raises(ValueError, match="not one of same, stale"):
        unit_lr_scale("fresh", 1, 2)
    with pytest.raises(ConfigError, match="optim.unit_lr: 'fresh' is not one of same, stale"):
        load_config(None, ["optim.unit_lr=fresh"])


@pytest.mark.timeout(300)
def test_trainer_applies_the_stale_rule(tmp_path):
    motion = make_motion(tmp_path / "m")
    one = ["--set", "run.iterations=1", "--set", "data.flip=false"]
    runs = {"init": ["--set", "optim.lr=0"], "same": [],
            "stale": ["--set", "optim.unit_lr=stale"]}
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
            assert same == pytest.approx(lr, rel=1e-3), (l, k)
            assert stale == pytest.approx(lr / (1 + 2 * (L - l)), rel=1e-3), (l, k)
