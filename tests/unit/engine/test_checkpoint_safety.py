"""Checkpoints are data, never code; bad ones are one-line errors; evaluation takes the newest.

- A crafted pickle (an object whose ``__reduce__`` calls ``pathlib.Path.touch`` or
  ``os.system('touch MARKER')``) is refused, with one line naming the file and the global, by
  every loader: exported/plain weight files, ``rng_rank*.pt``, and DeepSpeed model/optimizer
  states inside otherwise real ZeRO 0/2/3 and universal checkpoint folders (before DeepSpeed's
  own ``weights_only=False`` loaders run). The marker file is never created; a control shows
  the same file does create it under ``torch.load(weights_only=False)``.
- The allow-list is exactly what DeepSpeed writes: every pickle of real ZeRO 0-3 bf16/fp32 and
  universal checkpoints needs nothing outside it (torch's own ``get_unsafe_globals_in_checkpoint``),
  and each listed class occurs in one of them; megavid's RNG files need nothing at all.
- Random bytes, a truncated export, an empty file, a missing file, a damaged folder and a model
  of another size: one CheckpointError line each.
- find_checkpoint/select_checkpoint: an export older than the newest step is rewritten from it
  (weights compared with DeepSpeed's own consolidation of that step).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import random
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megavid.engine import checkpoint as C
from megavid.errors import CheckpointError
from tests.helpers.drive import drive
from tests.helpers.megavid_toy import ToyModel

SYSTEM = f"{os.system.__module__}.{os.system.__name__}"  # what a pickle of os.system imports


# --------------------------------------------------------------------------------------------
# crafted payloads
# --------------------------------------------------------------------------------------------
class _Touch:
    """Unpickling it calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class _System:
    """Unpickling it runs ``touch marker`` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _craft(path: Path, marker: Path, *, payload=_System, base: dict | None = None, form: str = "zip") -> Path:
    """Write ``base`` (default: a small state dict) plus a payload object to ``path``."""
    obj = dict(base if base is not None else {"w": torch.zeros(2, 3)})
    obj["payload"] = payload(marker)
    if form == "zip":
        torch.save(obj, path)
    elif form == "zip-protocol4":  # STACK_GLOBAL instead of GLOBAL
        torch.save(obj, path, pickle_protocol=4)
    elif form == "legacy":  # torch's pre-1.6 format: several pickles, no zip
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif form == "raw-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def _assert_refused(excinfo, path: Path, name: str | None = None) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert f"refusing to load {path}" in msg, msg
    assert "megavid loads only tensors and plain data" in msg, msg
    if name:
        assert re.search(rf"would import [^;]*\b{re.escape(name)}\b", msg), msg


def test_the_payload_is_live(tmp_path):
    """Control: without megavid's loader the crafted files do run their code."""
    for payload in (_Touch, _System):
        marker = tmp_path / f"marker_{payload.__name__}"
        f = _craft(tmp_path / f"{payload.__name__}.pt", marker, payload=payload)
        torch.load(f, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("form", ["zip", "zip-protocol4", "legacy", "raw-pickle"])
@pytest.mark.parametrize("payload", [_Touch, _System])
def test_crafted_weight_files_are_refused_by_every_loader(tmp_path, form, payload):
    from megavid.models.bert import BertTextFusion
    from megavid.models.weights import load_bert_into, read_state_dict

    marker = tmp_path / "MARKER"
    f = _craft(tmp_path / "model_fp32.pt", marker, payload=payload, form=form)
    name = SYSTEM if payload is _System else "pathlib"
    text = BertTextFusion(vocab_size=50, hidden_size=32, num_layers=1, fusion_layers=0, num_heads=4,
                          intermediate_size=64, max_position_embeddings=16)
    for load in (C.safe_load, C.load_exported, C.load_model_state, read_state_dict,
                 lambda p: load_bert_into(text, p), C.export_source, C.checkpoint_step):
        with pytest.raises(CheckpointError) as e:
            load(f)
        _assert_refused(e, f, name)
    with pytest.raises(CheckpointError) as e:  # a run dir holding the export
        C.load_model_state(tmp_path)
    _assert_refused(e, f, name)
    assert not marker.exists()


def test_plain_data_with_a_class_torch_allows_but_megavid_does_not(tmp_path):
    """torch.load(weights_only=True) alone would refuse too; the message names the global."""
    import collections

    f = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1), "c": collections.deque([1])}, f)
    with pytest.raises(CheckpointError) as e:
        C.safe_load(f)
    _assert_refused(e, f, "collections.deque")


# --------------------------------------------------------------------------------------------
# bad files: one line each
# --------------------------------------------------------------------------------------------
def test_bad_files_give_one_line_errors(tmp_path):
    from megavid.models.weights import read_state_dict

    good = tmp_path / "good.pt"
    torch.save({"format": "megavid-fp32", "source": "x/step_3", "state_dict": {"w": torch.randn(4096)}}, good)
    data = good.read_bytes()
    files = {
        "random": (os.urandom(20000), r"corrupted or not a torch checkpoint"),
        "random_pickle_head": (b"\x80\x02" + os.urandom(20000), r"corrupted or not a torch checkpoint"),
        "truncated": (data[: len(data) // 2], r"truncated"),
        "empty": (b"", r"empty"),
        "zip_without_data_pkl": (None, r"not a torch checkpoint"),
    }
    import zipfile

    for name, (content, pattern) in files.items():
        f = tmp_path / f"{name}.pt"
        if content is None:
            with zipfile.ZipFile(f, "w") as z:
                z.writestr("a/readme.txt", "hello")
        else:
            f.write_bytes(content)
        for load in (C.safe_load, C.load_exported, C.load_model_state, read_state_dict):
            with pytest.raises(CheckpointError) as e:
                load(f)
            msg = str(e.value)
            assert "\n" not in msg and str(f) in msg and re.search(pattern, msg), (name, msg)
            assert len(msg) < 400, msg
    for load in (C.safe_load, C.load_model_state, read_state_dict):
        with pytest.raises(CheckpointError, match="does not exist|not found") as e:
            load(tmp_path / "missing.pt")
        assert "\n" not in str(e.value)
    assert C.load_exported(good)["w"].shape == (4096,)  # the untruncated file is fine


def test_describe_misfit_names_three_keys_and_counts_the_rest():
    model = ToyModel(hidden=48)
    state = ToyModel().state_dict()
    # reference: the keys whose shapes differ, computed here
    differ = [k for k, v in model.state_dict().items() if v.shape != state[k].shape]
    assert len(differ) > 3
    with pytest.raises(CheckpointError) as e:
        C.load_state_strict(model, state, "ckpt.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("checkpoint ckpt.pt does not fit the model")
    assert f"{len(differ)} tensors have other shapes" in msg
    named = re.findall(r"([\w.]+): checkpoint \(([\d, ]*)\) vs model \(([\d, ]*)\)", msg)
    assert [k for k, _, _ in named] == differ[:3]
    for k, ck, mo in named:
        assert f"({ck})" == str(tuple(state[k].shape)) and f"({mo})" == str(tuple(model.state_dict()[k].shape))
    assert f"and {len(differ) - 3} more" in msg
    extra = {**ToyModel().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 tensors are not in the model \(extra\.weight\)"):
        C.load_state_strict(ToyModel(), extra, "x")
    partial = {k: v for k, v in ToyModel().state_dict().items() if k != "offset"}
    with pytest.raises(CheckpointError, match=r"1 model tensors are missing \(offset\)"):
        C.load_state_strict(ToyModel(), partial, "x")
    # DeepSpeed's own strict load (the fallback when the pre-check cannot see the shapes):
    # torch's many-line RuntimeError summarised the same way
    with pytest.raises(RuntimeError) as e:
        ToyModel(hidden=48).load_state_dict(state)
    assert str(e.value).count("\n") > 3
    short = C._describe_load_error(e.value)
    assert "\n" not in short and short.startswith(f"{len(differ)} tensors have other shapes")
    assert [k for k, _, _ in re.findall(r"([\w.]+): checkpoint \(([\d, ]*)\) vs model \(([\d, ]*)\)", short)] \
        == [k for k in state if k in differ][:3]


# --------------------------------------------------------------------------------------------
# RNG files: plain data
# --------------------------------------------------------------------------------------------
def _draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.randn(2).tolist(), torch.rand(3).tolist()


def test_rng_state_file_loads_with_torch_weights_only_and_restores_every_stream(tmp_path):
    np.random.randn()  # a cached gaussian in numpy's state
    state = C.get_rng_state()
    expected = _draws()
    f = tmp_path / "rng_rank0.pt"
    client = {"step": np.int64(3), "loader": {"cursor": np.int32(5)}, "where": tmp_path, "t": (1, 2.5)}
    torch.save({"rng": state, "client_state": C.to_plain(client)}, f)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == []
    saved = torch.load(f, weights_only=True)  # torch's restricted loader, nothing allowed extra
    assert saved["client_state"] == {"step": 3, "loader": {"cursor": 5}, "where": str(tmp_path), "t": (1, 2.5)}
    _draws()
    C.set_rng_state(saved["rng"])
    assert _draws() == expected


def test_rng_files_written_before_plain_data_still_restore(tmp_path):
    """numpy's own state tuple (a uint32 array) in an old rng file: read safely, restored."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = _draws()
    f = tmp_path / "rng_rank0.pt"
    torch.save({"rng": state, "client_state": {"step": 1}}, f)
    assert any(g.startswith("numpy") for g in torch.serialization.get_unsafe_globals_in_checkpoint(f))
    C.set_rng_state(C.safe_load(f)["rng"])
    assert _draws() == expected


def test_a_garbled_latest_file_falls_back_to_the_newest_step(tmp_path):
    for s in (2, 4):
        (tmp_path / f"step_{s}").mkdir()
    (tmp_path / "latest").write_bytes(b"\xff\x00garbage\n\x80")
    assert C.get_latest_tag(tmp_path) == "step_4"


# --------------------------------------------------------------------------------------------
# real DeepSpeed checkpoints (one subprocess trains them all)
# --------------------------------------------------------------------------------------------
RUNS = {f"z{s}_{p}": (s, p) for s in (0, 1, 2, 3) for p in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory) -> Path:
    """Toy runs: ZeRO 0-3 x fp32/bf16, 2 steps (z2_bf16: 4 steps, checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("ds_runs")
    runs = []
    for name, (stage, prec) in RUNS.items():
        steps = 4 if name == "z2_bf16" else 2
        runs.append({"overrides": [f"run.output_dir={out}", f"run.name={name}", "data.batch_size=8",
                                   f"train.zero_stage={stage}", f"train.precision={prec}",
                                   f"train.max_steps={steps}", "train.ckpt_every=2", "train.keep_last=0",
                                   "train.tensorboard=false", "optim.lr=1e-2"],
                     "overwrite": True, "task": {"num_samples": 64}})
    drive(runs)
    for name in ("z1_fp32", "z2_bf16", "z3_bf16"):  # universal copies of ZeRO 1-3
        C.convert_to_universal(out / name / "checkpoints" / "step_2")
    return out


def _tag(ds_runs: Path, name: str, tag: str = "step_2") -> Path:
    return ds_runs / name / "checkpoints" / tag


def _copy_tag(ds_runs: Path, name: str, dst: Path, tag: str = "step_2") -> Path:
    """A copy of a real checkpoint tag under dst/checkpoints/<tag> (with a `latest`)."""
    folder = dst / "checkpoints" / tag
    shutil.copytree(_tag(ds_runs, name, tag), folder)
    (dst / "checkpoints" / "latest").write_text(tag)
    return folder


def _craft_in_place(f: Path, marker: Path) -> Path:
    """Replace a real checkpoint file by its own content plus a payload."""
    base = torch.load(f, map_location="cpu", weights_only=False)  # written by this test: trusted
    return _craft(f, marker, base=base)


class _FakeEngine:
    """Stands in for a DeepSpeed engine: records whether DeepSpeed's loader was reached."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.module = module or ToyModel()
        self.calls = 0

    def load_checkpoint(self, *a, **k):
        self.calls += 1
        return None, None


@pytest.mark.slow
def test_allow_list_is_what_deepspeed_writes(ds_runs):
    """Reference: torch's own list of the globals each file needs beyond its defaults."""
    seen: set[str] = set()
    folders = [p for p in ds_runs.glob("*/checkpoints/step_*") if p.is_dir()]
    assert len(folders) == 8 + 1 + 3  # 8 runs, z2_bf16's step_4, 3 universal copies
    for folder in folders:
        for f in folder.rglob("*.pt"):
            need = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
            assert need <= C.ALLOWED_GLOBALS, (f, need - C.ALLOWED_GLOBALS)
            if f.name.startswith("rng_rank"):
                assert need == set(), f  # megavid's own files: plain data only
            seen |= need
        assert C.verify_checkpoint_folder(folder)  # and every file passes the check
    # nothing listed that DeepSpeed does not write (DynamicLossScaler: fp16, GPU only)
    assert set(C.DEEPSPEED_GLOBALS) - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"} <= seen
    assert not (seen & set(C.LEGACY_RNG_GLOBALS))


@pytest.mark.slow
@pytest.mark.parametrize("name,victim", [
    ("z0_fp32", "mp_rank_00_model_states.pt"),
    ("z2_bf16", "mp_rank_00_model_states.pt"),
    ("z2_fp32", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("z2_bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("z3_fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("z3_bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("z0_bf16", "rng_rank0.pt"),
    ("z2_fp32", "rng_rank0.pt"),
])
def test_crafted_file_in_a_real_deepspeed_folder_is_refused_before_deepspeed_reads(ds_runs, tmp_path, name, victim):
    marker = tmp_path / "MARKER"
    folder = _copy_tag(ds_runs, name, tmp_path / "run")
    clean = C.load_model_state(folder)  # the untouched copy loads
    assert clean and all(v.dtype == torch.float32 for v in clean.values())
    f = _craft_in_place(folder / victim, marker)
    engine = _FakeEngine()
    loads = [
        lambda: C.load_model_state(folder),                       # eval.checkpoint / model.weights
        lambda: C.load_model_state(tmp_path / "run"),             # ... given the run dir
        lambda: C.export_fp32(folder, tmp_path / "out.pt"),       # export-checkpoint
        lambda: C.load_checkpoint(engine, folder.parent, folder.name),  # --resume
    ]
    if any(folder.glob("*optim_states.pt")):  # ZeRO 1-3 convert to universal
        loads.append(lambda: C.convert_to_universal(folder, tmp_path / "uni"))
    for load in loads:
        with pytest.raises(CheckpointError) as e:
            load()
        _assert_refused(e, f, SYSTEM)
    assert engine.calls == 0 and not (tmp_path / "out.pt").exists() and not marker.exists()


@pytest.mark.slow
def test_crafted_file_in_a_universal_folder_is_refused_on_resume(ds_runs, tmp_path):
    marker = tmp_path / "MARKER"
    folder = _copy_tag(ds_runs, "z2_bf16", tmp_path / "run", tag="step_2_universal")
    f = _craft_in_place(next(folder.glob("zero/*/fp32.pt")), marker)
    engine = _FakeEngine()
    with pytest.raises(CheckpointError) as e:
        C.load_checkpoint(engine, folder.parent, folder.name)
    _assert_refused(e, f, SYSTEM)
    assert engine.calls == 0 and not marker.exists()


@pytest.mark.slow
def test_damaged_folders_give_one_line_errors(ds_runs, tmp_path):
    folder = _copy_tag(ds_runs, "z2_fp32", tmp_path / "a")
    optim = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        C.load_model_state(folder)
    assert "\n" not in str(e.value) and str(optim) in str(e.value) and "corrupted" in str(e.value)
    folder = _copy_tag(ds_runs, "z3_fp32", tmp_path / "b")
    model = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        C.load_model_state(folder)
    assert "\n" not in str(e.value) and str(model) in str(e.value) and "truncated" in str(e.value)
    for name, lost in [("z3_fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                       ("z0_fp32", "mp_rank_00_model_states.pt")]:  # a file lost in a copy
        folder = _copy_tag(ds_runs, name, tmp_path / f"lost_{name}")
        (folder / lost).unlink()
        with pytest.raises(CheckpointError) as e:
            C.load_model_state(folder)
        assert "\n" not in str(e.value) and str(folder) in str(e.value), str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z0_fp32", "z2_bf16", "z3_fp32", "z3_bf16"])
def test_resuming_another_model_size_is_one_line(ds_runs, name):
    folder = _tag(ds_runs, name)
    C._check_engine_fits(_FakeEngine(ToyModel()), folder)  # the same model fits
    engine = _FakeEngine(ToyModel(hidden=48))
    with pytest.raises(CheckpointError) as e:
        C.load_checkpoint(engine, folder.parent, folder.name)
    msg = str(e.value)
    differ = [k for k, v in ToyModel(hidden=48).state_dict().items() if v.shape != ToyModel().state_dict()[k].shape]
    assert "\n" not in msg and f"checkpoint {folder} does not fit the model" in msg
    assert f"{len(differ)} tensors have other shapes" in msg and f"and {len(differ) - 3} more" in msg
    assert len(re.findall(r"checkpoint \([\d, ]*\) vs model", msg)) == 3
    assert engine.calls == 0


@pytest.mark.slow
def test_stale_export_is_rewritten_from_the_newest_step(ds_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ds_runs / "z2_bf16", run)
    ckpts = run / "checkpoints"
    assert [t for _, t in C.get_step_tags(ckpts)] == ["step_2", "step_4"]
    # reference weights: DeepSpeed's zero_to_fp32 on each step folder, called directly
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ref = {s: get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=f"step_{s}") for s in (2, 4)}
    assert not torch.equal(ref[2]["stem.weight"], ref[4]["stem.weight"])
    export = C.export_fp32(ckpts / "step_2")
    assert export == run / C.EXPORT_NAME and C.export_source(export) == (str(ckpts / "step_2"), 2)

    sel = C.select_checkpoint(run)
    assert (sel.path, sel.step) == (str(export), 4) and "step 2" in sel.note and "step_4" in sel.note
    sd = C.load_exported(export)
    for k, v in ref[4].items():
        torch.testing.assert_close(sd[k], v.float(), rtol=0, atol=0)
    assert C.checkpoint_step(export) == 4
    # current now: kept as it is
    before = (export.stat().st_mtime_ns, export.read_bytes())
    assert C.find_checkpoint(run) == str(export)
    assert (export.stat().st_mtime_ns, export.read_bytes()) == before
    # an export that records no source: file times decide
    torch.save(ref[2], export)
    old = time.time() - 3600
    os.utime(export, (old, old))
    assert C.find_checkpoint(run, refresh_export=False) == str(ckpts / "step_4")
    assert C.find_checkpoint(run) == str(export) and C.export_source(export)[1] == 4
    torch.save(ref[2], export)  # written after the newest checkpoint: kept
    assert C.find_checkpoint(run) == str(export) and C.export_source(export) == (None, None)
    # a named step folder or file is used as named
    assert C.select_checkpoint(ckpts / "step_2").path == str(ckpts / "step_2")
    assert C.select_checkpoint(ckpts / "step_2").step == 2
