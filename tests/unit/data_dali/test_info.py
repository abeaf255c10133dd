"""`megavid info`: versions from the installed modules, real decode checks, the auto choice
for a shard folder, and the /dev/shm warning."""

from __future__ import annotations

import json

import av
import pytest
import torch
import transformers
import webdataset

from megavid import cli, info

GIB = 1 << 30


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = info.main(list(argv))
    return rc, capsys.readouterr().out


def test_json_report(vp9_shards, h264_shards, capsys):
    rc, out = _run(capsys, "--json", "--workers", "2", "--shards", str(vp9_shards),
                   "--shards", str(h264_shards))
    assert rc == 0
    r = json.loads(out)
    v = r["versions"]
    # versions agree with what the imported modules say about themselves
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    assert v["av (PyAV)"] == av.__version__
    assert v["transformers"] == transformers.__version__
    assert v["webdataset"] == webdataset.__version__
    dali = pytest.importorskip("nvidia.dali")
    assert v["nvidia-dali"].split()[0] == dali.__version__
    assert set(v) >= {"python", "deepspeed"}
    assert len(r["devices"]) == max(1, torch.cuda.device_count())

    decode = r["decode"]
    assert decode["PyAV CPU (vp9)"]["ok"] is True
    assert decode["PyAV CPU (h264)"]["ok"] is True
    assert decode["DALI cpu (vp9)"]["ok"] is True
    try:
        import decord
    except ImportError:
        assert v["decord"] == "not installed" and decode["decord CPU (h264)"]["ok"] is None
    else:
        assert v["decord"] == decord.__version__
        assert decode["decord CPU (h264)"]["ok"] is True
        if auto_is_pyav := (r["auto"][str(h264_shards)]["backend"] == "pyav"):
            # auto says why it leaves decord out, and how to select it
            assert "data.backend=decord" in r["auto"][str(h264_shards)]["reason"]
        assert auto_is_pyav or torch.cuda.is_available()
    if torch.cuda.is_available():
        assert decode["DALI mixed (h264)"]["ok"] is True
    else:
        assert decode["DALI mixed (h264)"]["ok"] is None

    auto = r["auto"]
    assert auto[str(vp9_shards)]["codec"] == "vp9"
    assert auto[str(h264_shards)]["codec"] == "h264"
    from megavid.data.build import select_backend

    # the report shows select_backend's decision (its rule is tested in test_dali_loader.py)
    assert auto[str(h264_shards)]["backend"] == select_backend("h264")[0]
    if not torch.cuda.is_available():
        assert auto[str(h264_shards)]["backend"] == "pyav"
    assert auto[str(h264_shards)]["reason"]
    assert r["shm"]["workers"] == 2
    assert auto[str(vp9_shards)]["dali_reader"]["ok"] is True


def test_reader_check_catches_a_wrong_idx(vp9_shards, tmp_path):
    """An index whose offsets are off by one block makes DALI read other bytes: reported."""
    import shutil

    pytest.importorskip("nvidia.dali")
    bad = tmp_path / "shards"
    shutil.copytree(vp9_shards, bad)
    idx = bad / "00000.idx"
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(int(fields[1]) + 512)  # the first sample's first member, one block late
    idx.write_text("\n".join([lines[0], " ".join(fields)] + lines[2:]) + "\n")
    r = info.check_dali_reader(bad)
    assert r.ok is False and "00000" in r.detail
    assert info.check_dali_reader(vp9_shards).ok is True


def test_dali_cpu_check_really_decodes():
    """The DALI CPU decoder cannot read H.264: the check must say so, not just import DALI."""
    pytest.importorskip("nvidia.dali")
    r = info.check_dali("cpu", "h264")
    assert r.ok is False and r.detail


def test_shm_warning():
    assert info.check_shm(4 * GIB, 2) is None
    warning = info.check_shm(GIB // 2, 2)
    assert "0.50 GiB" in warning and "--shm-size=2g" in warning
    assert "does not exist" in info.check_shm(None, 1)
    assert info.check_shm(None, 0) is None


def test_cli_text_report(vp9_shards, capsys):
    rc = cli.main(["info", "--no-decode", "--workers", "100000", "--shards", str(vp9_shards)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"data.backend=auto for {vp9_shards}:" in out and "codec vp9" in out
    assert "WARNING: /dev/shm" in out  # nobody has 100000 GiB of shared memory


def test_missing_shard_folder_is_reported(tmp_path, capsys):
    rc, out = _run(capsys, "--no-decode", "--json", "--shards", str(tmp_path / "nope"))
    assert rc == 0
    assert "does not exist" in json.loads(out)["auto"][str(tmp_path / "nope")]["error"]


def test_info_prints_the_decode_plan(vp9_shards, image_shards, capsys):
    """`megavid info --shards` prints the plan of this machine, its reason and the results file
    it rests on (kind and codec: what the fixtures wrote)."""
    from megavid.data.build import plan_decode

    rc = cli.main(["info", "--no-decode", "--shards", str(vp9_shards), "--shards",
                   str(image_shards)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    for shards, kind, codec in ((vp9_shards, "video", "vp9"), (image_shards, "images", "image")):
        plan = plan_decode(kind, codec)
        head = (f"data.backend=auto for {shards}: {plan.backend} ({plan.device}); codec {codec} "
                f"({kind} shards): {plan.reason}")
        at = next(i for i, line in enumerate(lines) if line.startswith(head))
        assert lines[at + 1] == f"  decode plan rests on: {plan.source}"
        assert plan.source == ("bench/results/loader_gpu_nvidia-h200.md"
                               if torch.cuda.is_available() else "bench/results/loader_cpu-2core.md")
    # the JSON report carries the same plan
    r = json.loads(_run(capsys, "--no-decode", "--json", "--shards", str(image_shards))[1])
    plan = plan_decode("images", "image")
    assert {k: r["auto"][str(image_shards)][k] for k in ("shard_kind", "codec", "path", "source")} \
        == {"shard_kind": "images", "codec": "image", "path": plan.path, "source": plan.source}
