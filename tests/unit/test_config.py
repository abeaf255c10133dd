"""Config composition and validation: groups, precedence, unknown keys, wrong types."""

from pathlib import Path

import pytest

from megavid.config import Config, compose, load_saved, to_yaml
from megavid.errors import ConfigError
from tests.helpers.multiprocess import python_module, run_job


@pytest.fixture
def cfgdir(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "experiment").mkdir()
    (tmp_path / "model" / "small.yaml").write_text(
        "video: {img_size: 32, patch_size: 16, num_frames: 4, embed_dim: 64, num_heads: 4}\n"
    )
    (tmp_path / "model" / "big.yaml").write_text("video: {embed_dim: 96, num_heads: 4}\n")
    (tmp_path / "data" / "d.yaml").write_text("batch_size: 3\n")
    (tmp_path / "experiment" / "e.yaml").write_text(
        "defaults: {model: small, data: d}\ntrain: {max_steps: 7}\nmodel: {video: {depth: 2}}\n"
    )
    return tmp_path


def test_defaults_are_valid():
    cfg = compose([])
    assert isinstance(cfg, Config)
    assert cfg.model.video.num_frames == cfg.data.num_frames


def test_precedence(cfgdir):
    cfg = compose(["experiment=e"], cfgdir)
    assert (cfg.model.video.embed_dim, cfg.model.video.depth, cfg.train.max_steps) == (64, 2, 7)
    assert cfg.data.batch_size == 3
    # a group named on the command line beats the experiment's defaults but not its values
    cfg = compose(["experiment=e", "model=big"], cfgdir)
    assert cfg.model.video.embed_dim == 96 and cfg.model.video.depth == 2
    # dotted overrides beat everything; YAML parses the value
    cfg = compose(["experiment=e", "train.max_steps=11", "optim.lr=3e-4", "optim.betas=[0.8,0.9]"], cfgdir)
    assert cfg.train.max_steps == 11 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)


def test_yaml_file_layer(cfgdir, tmp_path):
    f = tmp_path / "extra.yaml"
    f.write_text("train: {max_steps: 5, log_every: 2}\n")
    cfg = compose(["experiment=e", str(f), "train.log_every=3"], cfgdir)
    assert (cfg.train.max_steps, cfg.train.log_every) == (5, 3)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["model.video.num_frame=8"], "unknown config key 'model.video.num_frame'; did you mean 'model.video.num_frames'?"),
        (["trian.max_steps=3"], "did you mean 'train"),
        (["train.max_steps=ten"], "'train.max_steps' expects an integer, got 'ten'"),
        (["train.precision=fp8"], "'train.precision' = 'fp8' is not one of"),
        (["run.debug=3"], "'run.debug' expects true/false"),
        (["optim.betas=[0.9]"], "'optim.betas' expects 2 values"),
        (["train.zero_stage=4"], "train.zero_stage=4 must be 0, 1, 2 or 3"),
        (["task.qa_pairs_per_sample=-1"], "task.qa_pairs_per_sample=-1 must be >= 0 (0: every QA pair"),
        (["data.crop_scale=[0.8,0.5]"], "data.crop_scale=[0.8, 0.5] must be [min, max] with 0 < min <= max <= 1"),
        (["model.video.num_frames=16", "data.num_frames=8"], "data.num_frames=8 differs from model.video.num_frames=16"),
        (["model=nope"], "no config 'nope' in group 'model'"),
        (["justaword"], "cannot read argument 'justaword'"),
        (["missing.yaml"], "config file not found: missing.yaml"),
    ],
)
def test_errors_name_the_key_and_fix(tokens, message):
    with pytest.raises(ConfigError) as e:
        compose(tokens)
    assert message in str(e.value)


def test_saved_config_round_trip(tmp_path):
    cfg = compose(["experiment=demo", "train.max_steps=3"])
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(cfg))
    assert load_saved(p) == cfg


def test_cli_error_is_one_line_without_traceback():
    r = run_job(python_module("megavid.cli", "pretrain", "experiment=demo", "model.video.num_frame=8"), timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "did you mean 'model.video.num_frames'" in r.stderr
    assert "Traceback" not in r.stderr
