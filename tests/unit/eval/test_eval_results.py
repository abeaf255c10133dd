"""Results JSON: the checkpoint hash is recomputed independently (hashlib, and the coreutils
`sha256sum` pipeline the docstring promises) and every field round-trips through JSON."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
import torch

from megavid.errors import CheckpointError
from megavid.eval.results import file_sha256, verify_results, write_results


@pytest.fixture
def ds_checkpoint(tmp_path):
    """A folder shaped like a DeepSpeed checkpoint tag, with real torch.save'd shards."""
    tag = tmp_path / "checkpoints" / "step_4"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(6.0)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer": {"state": {}}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "sub").mkdir()
    (tag / "sub" / "extra.json").write_text('{"a": 1}\n')
    (tag.parent / "latest").write_text("step_4")
    return tag


def test_file_hash_matches_hashlib(tmp_path):
    f = tmp_path / "model.pt"
    torch.save({"w": torch.randn(100)}, f)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_folder_hash_matches_manual_and_sha256sum(ds_checkpoint):
    members = sorted(p.relative_to(ds_checkpoint).as_posix() for p in ds_checkpoint.rglob("*")
                     if p.is_file())
    manifest = "".join(f"{hashlib.sha256((ds_checkpoint / m).read_bytes()).hexdigest()}  {m}\n"
                       for m in members)
    expected = hashlib.sha256(manifest.encode()).hexdigest()
    assert file_sha256(ds_checkpoint) == expected
    if shutil.which("sha256sum") and shutil.which("find"):
        cmd = ("find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum")
        out = subprocess.run(cmd, shell=True, cwd=ds_checkpoint, capture_output=True, text=True,
                             check=True).stdout.split()[0]
        assert out == expected
    # any change of content or of a member's name changes the hash
    (ds_checkpoint / "sub" / "extra.json").write_text('{"a": 2}\n')
    assert file_sha256(ds_checkpoint) != expected
    (ds_checkpoint / "sub" / "extra.json").write_text('{"a": 1}\n')
    assert file_sha256(ds_checkpoint) == expected
    (ds_checkpoint / "sub" / "extra.json").rename(ds_checkpoint / "sub" / "other.json")
    assert file_sha256(ds_checkpoint) != expected


def test_write_results_round_trip_and_verify(tmp_path, ds_checkpoint):
    metrics = {"vtc/t2v_R@1": torch.tensor(12.5), "qa": {"acc": 50.0}, "undefined": float("nan")}
    cfg = {"model": {"name": "tiny"}, "run": {"output_dir": tmp_path}}
    out = tmp_path / "eval" / "results.json"
    write_results(out, metrics, cfg, ds_checkpoint)
    doc = json.loads(out.read_text())  # strict JSON: NaN was written as null
    assert doc["metrics"] == {"vtc/t2v_R@1": 12.5, "qa": {"acc": 50.0}, "undefined": None}
    assert doc["config"] == {"model": {"name": "tiny"}, "run": {"output_dir": str(tmp_path)}}
    assert doc["checkpoint"]["kind"] == "directory"
    assert doc["checkpoint"]["sha256"] == file_sha256(ds_checkpoint)
    # the distribution version, as torch itself reports it (minus the local "+cuXXX" tag)
    assert doc["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "python" in doc["versions"] and "deepspeed" in doc["versions"]
    assert verify_results(out)
    # tamper with the checkpoint: the recorded hash no longer matches
    torch.save({"module": {"w": torch.zeros(6)}}, ds_checkpoint / "mp_rank_00_model_states.pt")
    assert not verify_results(out)
    assert not list(out.parent.glob("*.tmp"))  # atomic write left nothing behind


def test_missing_checkpoint_and_baseline(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        write_results(tmp_path / "r.json", {}, {}, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no files"):
        file_sha256(tmp_path / "empty")
    doc = write_results(tmp_path / "r.json", {"acc": 1.0}, {}, None)  # random-init baseline
    assert doc["checkpoint"] is None
