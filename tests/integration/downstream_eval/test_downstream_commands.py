"""The downstream evaluation commands end to end on the synthetic data (real VP9 shards, real
DeepSpeed runs, the real MiniLM tokenizer): eval-zeroshot-cls, linear-probe, extract-features
(finetune-cls and eval-egocentric on the released annotation formats:
test_downstream_released_formats.py). Every results JSON must name the checkpoint's sha256, and
every reported number is recomputed here from an independent path (the reloaded features, the
model itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megavid.cli import main
from megavid.config import compose

pytestmark = pytest.mark.slow


def _doc(path: Path) -> dict:
    assert path.is_file(), path
    return json.loads(path.read_text())


def _ckpt_dir(run_dir: Path) -> Path:
    from megavid.engine.checkpoint import find_checkpoint

    ck = find_checkpoint(run_dir)
    assert ck is not None
    return Path(ck)


def _hit_rate(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Percent of rows whose correct column beats every other column strictly (ties lose)."""
    true = scores.gather(1, correct[:, None])
    return float(((scores >= true).sum(1) == 1).double().mean() * 100)


def test_extract_features_reload_equal_model_outputs(base_args, pretrained):
    from megavid.engine.checkpoint import load_model_state
    from megavid.eval.results import file_sha256
    from megavid.models import build_model
    from megavid.tasks.base import VideoTextTask
    from megavid.tasks.features import load_features

    args = base_args + ["run.name=pre", "eval.split=val", "task.cls.features_format=npy"]
    assert main(["extract-features", *args, "--overwrite"]) == 0
    cfg = compose(args)
    folder = cfg.run_dir / "features" / "val"
    feats = load_features(folder)
    assert len(feats["keys"]) == 64 and feats["video"].shape == (64, cfg.model.proj_dim)
    doc = _doc(folder / "extract.json")
    assert doc["checkpoint"]["sha256"] == file_sha256(_ckpt_dir(cfg.run_dir))

    # the model, rebuilt from the checkpoint, on the loader's first batch
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(_ckpt_dir(cfg.run_dir)), strict=True)
    model.eval()
    task = VideoTextTask(cfg)
    batch = next(iter(task.build_eval_loader("val")))
    b = task.to_device(batch)
    with torch.no_grad():
        _, v = model.encode_video(b["video"])
        _, t = model.encode_text(b["input_ids"], b["attention_mask"])
        _, pooled = model.video_encoder(b["video"])
    rows = [feats["keys"].index(k) for k in batch["keys"]]
    torch.testing.assert_close(feats["video"][rows], v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["text"][rows], t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["video_pooled"][rows], pooled, rtol=1e-5, atol=1e-5)
    assert feats["captions"][rows[0]] == batch["captions"][0]


def test_zeroshot_classification(base_args, pretrained):
    from megavid.engine.checkpoint import load_model_state
    from megavid.eval.results import file_sha256
    from megavid.models import build_model
    from megavid.tasks.base import VideoTextTask
    from megavid.tasks.zeroshot_cls import zeroshot_classifier
    from megavid.tasks.features import load_features

    args = base_args + ["run.name=pre", "task=cls_synthetic_colour", "eval.split=val"]
    assert main(["eval-zeroshot-cls", *args]) == 0
    cfg = compose(args)
    doc = _doc(cfg.run_dir / "eval" / "zeroshot_cls_val_step24.json")
    assert doc["checkpoint"]["sha256"] == file_sha256(_ckpt_dir(cfg.run_dir))
    m = doc["metrics"]
    assert m["num_samples"] == 64 and m["chance"]["top1"] == pytest.approx(12.5)

    # independent: features extracted by another command + the prompt classifier by hand
    assert main(["extract-features", *args]) == 0
    feats = load_features(cfg.run_dir / "features" / "val")
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(_ckpt_dir(cfg.run_dir)), strict=True)
    model.eval()
    classes = cfg.task.cls.classes
    with torch.no_grad():
        W = zeroshot_classifier(model, VideoTextTask(cfg), classes, list(cfg.task.cls.templates))
    y = torch.tensor([classes.index(x["attributes"]["colour"]) for x in feats["meta"]])
    assert m["metrics"]["top1"] == pytest.approx(_hit_rate(feats["video"] @ W, y), abs=1e-6)


def test_linear_probe_trained_beats_random_encoder(base_args, pretrained):
    """The standard protocol's claim: the pretrained encoder's frozen features are better than
    a random encoder's, on 256 held-out clips, by a margin measured in standard errors of the
    paired per-clip difference (both probes score the same clips)."""
    from megavid.eval.results import file_sha256

    ck = _ckpt_dir(pretrained)
    docs, hits = {}, {}
    for name, ckpt in (("trained", str(ck)), ("random", "random")):
        args = base_args + [f"run.name=probe_{name}", "task=cls_synthetic_colour",
                            f"eval.checkpoint={ckpt}", "eval.split=test"]
        assert main(["linear-probe", *args]) == 0
        cfg = compose(args)
        out = cfg.run_dir / "eval" / f"linear_probe_test_{'step24' if name == 'trained' else 'random'}.json"
        docs[name] = _doc(out)
        scores_file = out.with_name(docs[name]["metrics"]["scores"]["file"])
        assert file_sha256(scores_file) == docs[name]["metrics"]["scores"]["sha256"]
        saved = torch.load(scores_file, weights_only=True)
        # the truth from the clips' own attributes, not from the saved targets
        feats_meta = [json.loads(x) for x in
                      (cfg.run_dir / "features" / "test" / "index.jsonl").read_text().splitlines()]
        colour = {r["key"]: cfg.task.cls.classes.index(r["meta"]["attributes"]["colour"])
                  for r in feats_meta}
        y = torch.tensor([colour[k] for k in saved["keys"]])
        assert torch.equal(saved["targets"], y)
        true = saved["scores"].gather(1, y[:, None])
        hits[name] = dict(zip(saved["keys"], ((saved["scores"] >= true).sum(1) == 1).tolist()))
        assert docs[name]["metrics"]["metrics"]["top1"] == pytest.approx(
            100 * sum(hits[name].values()) / len(y), abs=1e-9)
        if name == "random":
            continue
        # features are cached: a second run reuses them (same checkpoint hash) and agrees
        # (the results file is refused unless replaced, and --overwrite would re-extract)
        cached = (cfg.run_dir / "features" / "train" / "extract.json").stat().st_mtime_ns
        assert main(["linear-probe", *args]) == 2
        out.unlink()
        assert main(["linear-probe", *args]) == 0
        assert (cfg.run_dir / "features" / "train" / "extract.json").stat().st_mtime_ns == cached
        assert _doc(out)["metrics"]["metrics"] == docs[name]["metrics"]["metrics"]
    assert docs["trained"]["checkpoint"]["sha256"] == file_sha256(ck)
    assert docs["random"]["checkpoint"] is None
    tr, rnd = docs["trained"]["metrics"], docs["random"]["metrics"]
    assert len(tr["sweep"]) == 6 and tr["num_train"] == 256 and tr["num_test"] == 256
    assert hits["trained"].keys() == hits["random"].keys()
    diff = torch.tensor([float(hits["trained"][k]) - float(hits["random"][k]) for k in hits["trained"]])
    se = float(diff.std() / len(diff) ** 0.5)
    margin = float(diff.mean())
    print(f"linear probe top-1: trained {tr['metrics']['top1']:.1f} vs random {rnd['metrics']['top1']:.1f} "
          f"on {len(diff)} clips; margin {100 * margin:.1f} points = {margin / se:.2f} SE (paired)")
    assert margin > 2 * se, (tr["metrics"], rnd["metrics"], margin, se)
