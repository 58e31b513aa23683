"""Architectures from text (ssmpi.nn.architecture, model.arch / model.arch_file): good files,
every kind of bad file (one line naming the unit and layer, exit 2 in the trainer), and a
model trained from a TOML architecture equal to the same preset-built model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from train_helpers import ENV, TRAIN, base_args, make_motion, program_lines, run_train

from ssmpi import checkpoint as ckpt
from ssmpi.config import ConfigError, config_from_dict, load_config
from ssmpi.engine.bptt import BPTT
from ssmpi.engine.topology import Topology
from ssmpi.nn import architecture as A
from ssmpi.nn import models
from ssmpi.nn.ops.gradcheck import check_vjp

ROOT = Path(__file__).resolve().parents[1]
ARCHS = sorted((ROOT / "jobs" / "archs").glob("*.toml"))


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return make_motion(tmp_path_factory.mktemp("motion"))


# -- good text --------------------------------------------------------------------------------
def test_every_layer_kind_parses():
    cases = {
        "conv 16": ("conv", 16, 3, 1), "conv 8 k=5 stride=2": ("conv", 8, 5, 2),
        "conv 4 k=1": ("conv", 4, 1, 1), "relu": ("relu",), "maxpool": ("pool", 2),
        "maxpool 3": ("pool", 3), "pool 2": ("pool", 2), "avgpool": ("avgpool", 2),
        "avgpool 4": ("avgpool", 4), "gap": ("gap",), "globalpool": ("gap",),
        "linear 10": ("linear", 10), "linear classes": ("linear", "classes"),
        "dropout 0.5": ("dropout", 0.5), "dropout 0": ("dropout", 0.0), "s2d": ("s2d", 2),
        "s2d 4": ("s2d", 4), "identity": ("identity",), "  ReLU  ": ("relu",),
    }
    for text, want in cases.items():
        assert A.parse_layer(text) == want, text
    # and back: the text form parses to the same description
    for want in cases.values():
        if want[1:2] != ("classes",):
            assert A.parse_layer(A.format_layer(want)) == want


@pytest.mark.parametrize("path", ARCHS, ids=lambda p: p.stem)
def test_shipped_architecture_files(path):
    d = A.load_arch_file(path)
    spec = A.build_spec(d["units"], 4, (32, 32, 3), name=d["name"])
    assert spec.head == "classify" and spec.num_classes == 4
    # every shipped model lets frames of different times meet in >= 2 conv units: a unit
    # U_l >= 3 receives a shortcut and holds a conv (the point of the issue-16 study)
    topo = Topology(spec, mode="skip", k=2)
    meet = [l for l in range(3, topo.L + 1) if any(d[0] == "conv" for d in spec.modules[l - 1])]
    assert len(meet) >= 2, (path.stem, meet)


@pytest.mark.parametrize("name,kw", [
    ("tiny", dict(num_classes=3, units=5, width=4, resolution=16)),
    ("vgg8", dict(num_classes=5, width=0.125, resolution=32, s2d=True)),
    ("vgg16", dict(num_classes=7, width=0.0625, resolution=32)),
    ("fullres", dict(units=3, width=4, resolution=12)),
])
def test_presets_round_trip_through_text(name, kw):
    spec = models.get_model(name, **kw)
    text = A.units_of_spec(spec)
    again = A.build_spec(text, spec.num_classes, spec.in_shape)

    def layers(s):  # what the engine builds from each module: kinds, sizes, shapes
        shape, out = s.in_shape, []
        for m in s.modules:
            for layer in models.make_layers(m):
                shape = layer.build(shape)
                out.append((layer.describe(), shape))
        return out
    assert layers(again) == layers(spec)
    assert (again.head, again.num_classes) == (spec.head, spec.num_classes)
    # and through an architecture file
    back = tomllib.loads(A.to_toml(text, name=name, about="x"))
    assert back["units"] == text


def test_preset_cli_and_check_cli(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ssmpi.nn.architecture", "tiny", "--units", "6",
                        "--width", "16"], capture_output=True, text=True, timeout=60, env=ENV)
    assert p.returncode == 0, p.stderr
    (tmp_path / "t6.toml").write_text(p.stdout)
    shipped = A.load_arch_file(ROOT / "jobs" / "archs" / "tiny6.toml")["units"]
    assert A.load_arch_file(tmp_path / "t6.toml")["units"] == shipped
    c = subprocess.run([sys.executable, "-m", "ssmpi.nn.architecture", str(tmp_path / "t6.toml"),
                        "--resolution", "32"], capture_output=True, text=True, timeout=60,
                       env=ENV)
    assert c.returncode == 0 and "unit 6: gap, linear 4" in c.stdout, c.stdout + c.stderr


def test_avgpool_layer_vjp():
    rng = np.random.default_rng(0)
    spec = A.build_spec([["avgpool 2", "conv 2"], ["gap", "linear 2"]], 2, (4, 6, 3))
    (pool, conv) = models.make_layers(spec.modules[0])
    assert pool.build((4, 6, 3)) == (2, 3, 3)

    def f(x):
        y, res = pool.forward(x)
        return y, lambda dy: [pool.backward(res, dy)[0]]
    check_vjp(f, [rng.standard_normal((2, 4, 6, 3))], rng=rng)


def test_frames_head_is_inferred():
    spec = A.build_spec([["conv 8", "relu"], ["conv 3"]], 0, (12, 12, 3))
    assert spec.head == "frames"


def test_bptt_and_baselines_take_a_text_model():
    """The BPTT twin and the causal 3D baseline build from the same text model."""
    from ssmpi.baselines import CausalBP, causal3d

    units = [["conv 4", "relu", "maxpool 2"], ["conv 4", "relu"], ["conv 4", "relu"],
             ["gap", "linear classes"]]
    spec = models.custom(units, 2, resolution=8)
    rng = np.random.default_rng(1)
    f = rng.standard_normal((2, 6, 8, 8, 3)).astype(np.float32)
    y = np.array([0, 1])
    st = BPTT(Topology(spec, mode="skip", k=2)).run_clip(6, f, y, update=False)
    assert np.isfinite(st.loss)
    cb = CausalBP(causal3d("custom", kt=2, arch=units, num_classes=2, resolution=8), batch=2)
    assert np.isfinite(np.mean(cb.run_clip(6, f, y)))


# -- bad text: one line naming where ---------------------------------------------------------
BAD_UNITS = [
    ([["conv"]], 'unit 1, layer 1 ("conv"): conv: expected conv C'),
    ([["conv x"]], "conv channels must be an integer"),
    ([["conv 16 k=4"]], "conv k must be odd"),
    ([["conv 16 k=3 k=5"]], "k given twice"),
    ([["conv 16 pad=1"]], "unknown option pad="),
    ([["conv 0"]], "conv channels must be an integer >= 1"),
    ([["relu 3"]], "relu: expected relu"),
    ([["maxpool 2 2"]], "maxpool: expected maxpool [K=2]"),
    ([["dropout 1.5"]], "dropout P must be in [0, 1)"),
    ([["dropout"]], "dropout: expected dropout P"),
    ([["linear -3"]], "linear size must be an integer >= 1"),
    ([["batchnorm"]], "unknown layer kind 'batchnorm'"),
    ([["conv 4"], ["relu", ""]], 'unit 2, layer 2 (""): empty layer'),
    ([["conv 4"], [3]], "unit 2, layer 1 (3): a layer must be a string"),
    ([["conv 4"], []], "unit 2: a unit needs at least one layer"),
    ([["conv 4"], "relu"], "unit 2: expected a list of layers"),
    ([], "expected a non-empty list of units"),
]


@pytest.mark.parametrize("units,message", BAD_UNITS)
def test_bad_text_is_one_line_naming_unit_and_layer(units, message):
    with pytest.raises(A.ArchitectureError) as e:
        A.parse_units(units)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("model.arch")


BAD_SHAPES = [
    ([["conv 4"], ["linear classes"]], 'unit 2, layer 1 ("linear classes"): needs a vector '
     'input, got (8, 8, 4); put "gap" before it'),
    ([["gap"], ["conv 4"]], 'unit 2, layer 1 ("conv 4"): needs an image'),
    ([["gap"], ["maxpool 2"]], "needs an image"),
    ([["maxpool 16"], ["gap", "linear 2"]], "pool size 16 larger than its input (8, 8, 3)"),
    ([["avgpool 9"], ["gap", "linear 2"]], "pool size 9 larger"),
    ([["s2d 3"], ["gap", "linear 2"]], "not divisible by block 3"),
    ([["conv 4"], ["gap", "linear 3"]], "the model outputs 3 values but there are 2 classes"),
    ([["conv 4"], ["gap", "linear 1"]], "outputs 1 values but there are 2"),
    ([["conv 4"], ["conv 4"]], "must end in a vector of class scores"),
]


@pytest.mark.parametrize("units,message", BAD_SHAPES)
def test_bad_shapes_name_unit_and_layer(units, message):
    with pytest.raises(A.ArchitectureError) as e:
        A.build_spec(units, 2, (8, 8, 3))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unknown_class_count():
    with pytest.raises(A.ArchitectureError, match="class count is unknown"):
        A.build_spec([["gap", "linear classes"]], 0, (8, 8, 3))


@pytest.mark.parametrize("text,message", [
    ("units = [[\"conv 4\"]", "not valid TOML"),
    ("name = \"x\"\n", "no 'units' list"),
    ("units = [[\"relu\"]]\nlayers = 3\n", "unknown key 'layers'"),
    ("units = [[\"conv 4\", \"nope\"]]\n", 'unit 1, layer 2 ("nope"): unknown layer kind'),
    ("name = \"\"\nunits = [[\"relu\"]]\n", "name must be a non-empty string"),
])
def test_bad_arch_files(tmp_path, text, message):
    p = tmp_path / "a.toml"
    p.write_text(text)
    with pytest.raises(A.ArchitectureError) as e:
        A.load_arch_file(p)
    assert message in str(e.value) and str(p) in str(e.value)
    with pytest.raises(A.ArchitectureError, match="does not exist"):
        A.load_arch_file(tmp_path / "missing.toml")


# -- the config --------------------------------------------------------------------------------
def test_config_embeds_the_architecture_file(tmp_path):
    arch = ROOT / "jobs" / "archs" / "probe.toml"
    cfg = load_config(None, ["model.name=custom", f"model.arch_file={arch}"])
    assert cfg.model.arch == A.load_arch_file(arch)["units"]
    assert cfg.model.arch_file == "" and cfg.model.arch_name == "probe"
    again = config_from_dict(tomllib.loads(cfg.to_toml()))  # the saved config alone
    assert again == cfg
    # a path relative to the config file's folder
    (tmp_path / "archs").mkdir()
    (tmp_path / "archs" / "m.toml").write_text('units = [["conv 4"], ["gap", "linear 2"]]\n')
    (tmp_path / "c.toml").write_text('[model]\nname = "custom"\narch_file = "archs/m.toml"\n')
    assert load_config(str(tmp_path / "c.toml")).model.arch[0] == ["conv 4"]
    # inline, and as JSON in --set
    c2 = load_config(None, ["model.name=custom", 'model.arch=[["conv 4"], ["gap", "linear 2"]]'])
    assert c2.model.arch == [["conv 4"], ["gap", "linear 2"]]


def test_job_config_finds_its_architecture_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(ROOT / "jobs" / "configs" / "motion32_probe_skip.toml"))
    assert cfg.model.arch == A.load_arch_file(ROOT / "jobs" / "archs" / "probe.toml")["units"]


@pytest.mark.parametrize("sets,message", [
    (["model.name=custom"], "model.name = 'custom' needs the units"),
    (['model.arch=[["relu"]]'], "model.name must be 'custom' (got 'vgg8')"),
    (["model.name=custom", 'model.arch=[["relu"]]', "model.arch_file=jobs/archs/probe.toml"],
     "model.arch and model.arch_file are both set"),
    (["model.name=custom", "model.arch_file=nope.toml"], "nope.toml does not exist"),
    (["model.name=custom", 'model.arch=[["conv 4 k=2"]]'], 'unit 1, layer 1 ("conv 4 k=2")'),
    (["model.name=custom", "model.arch=conv 4"], "config key model.arch: expected a list"),
    (["model.name=custom", "model.arch=[1, 2]"], "each a list of layer strings"),
])
def test_config_errors(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert message in str(e.value)


# -- the trainer -------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch,message", [
    ('[["conv 4", "relu"], ["linear classes"]]',
     'model.arch unit 2, layer 1 ("linear classes"): needs a vector input'),
    ('[["conv 4", "blur"], ["gap", "linear classes"]]',
     'model.arch unit 1, layer 2 ("blur"): unknown layer kind'),
])
def test_trainer_bad_architecture_exit_2(motion, tmp_path, arch, message):
    args = base_args(motion, tmp_path, "bad", "--set", "model.name=custom", "--set",
                     f"model.arch={arch}", "--dry-run")
    for n in (1, 2):
        p = run_train(n, args)
        assert p.returncode == 2, p.stdout + p.stderr
        err = program_lines(p.stderr)
        assert len(err) == 1 and message in err[0], p.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.timeout(300)
def test_text_model_trains_like_the_preset_and_its_config_alone_reproduces_it(motion,
                                                                              tmp_path):
    """tiny (4 units, width 4) as a preset and as an architecture file: same parameters
    after training, bitwise; the run folder's config.toml alone evaluates and resumes it."""
    spec = models.tiny(2, units=4, width=4, resolution=16)
    arch = tmp_path / "tiny4.toml"
    arch.write_text(A.to_toml(A.units_of_spec(spec), name="tiny4"))
    extra = ["--set", "run.iterations=4", "--set", "run.checkpoint_every=2"]
    a = run_train(2, base_args(motion, tmp_path, "preset", *extra))
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_train(2, base_args(motion, tmp_path, "text", *extra, "--set", "model.name=custom",
                               "--set", f"model.arch_file={arch}"))
    assert b.returncode == 0, b.stderr[-3000:]
    assert "tiny4(4 units)" in b.stdout
    pa = ckpt.read_parameters(ckpt.latest_checkpoint(tmp_path / "preset")[0])
    pb = ckpt.read_parameters(ckpt.latest_checkpoint(tmp_path / "text")[0])
    assert pa.keys() == pb.keys()
    for l in pa:
        assert pa[l].keys() == pb[l].keys()
        for k in pa[l]:
            assert np.array_equal(pa[l][k], pb[l][k]), (l, k)
    arch.unlink()  # from now on only the run folder describes the model
    e = subprocess.run([sys.executable, "-m", "ssmpi.evaluate", "--checkpoint",
                        str(tmp_path / "text"), "--json", str(tmp_path / "e.json")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert e.returncode == 0, e.stderr[-2000:]
    final = json.loads((tmp_path / "text" / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((tmp_path / "e.json").read_text())["clip_acc"] == \
        final["eval"]["clip_acc"]
    r = subprocess.run([*TRAIN, "--config", str(tmp_path / "text" / "config.toml"), "--resume",
                        "--set", "run.iterations=6"], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr[-2000:]
