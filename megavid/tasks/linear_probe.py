"""Linear probing (``megavid linear-probe``): the standard protocol for comparing pretrained
video encoders. The encoder is frozen; the pooled video features of the train, val and
``eval.split`` splits are extracted once (cached under ``<run_dir>/features``, see
:mod:`megavid.tasks.features`); an L2-regularised logistic regression is fitted on train for
each weight decay of ``task.cls.probe_weight_decays``, the best on ``data.val`` is kept, and
its score on ``eval.split`` is reported (top-1/top-5, or mAP for multi-label).
"""

from __future__ import annotations

from typing import Any

from megavid.config import Config
from megavid.errors import ConfigError
from megavid.tasks.class_results import chance_levels, write_class_results
from megavid.tasks.evaluation import open_eval, select_eval_weights
from megavid.tasks.features import get_split_features
from megavid.tasks.labels import LabelSpace, build_label_space

FEATURE = "video_pooled"
"""The probed feature: the video tower's pooled token (before the VTC projection)."""


def probe_features(train: dict[str, Any], val: dict[str, Any], test: dict[str, Any], labels: LabelSpace,
                   *, weight_decays: list[float], max_iter: int = 300) -> dict[str, Any]:
    """Fit the sweep on ``train``, choose on ``val``, score on ``test``.

    Args:
        train, val, test: feature dicts (``get_split_features``) with "meta" and ``FEATURE``.
        labels: the label space.
        weight_decays: the L2 sweep.
        max_iter: L-BFGS iterations per fit.

    Returns:
        {"metrics", "val_metrics", "weight_decay", "sweep", "num_train", "num_val", "num_test",
        "test_scores" ([N, C] float64 scores of ``test``, for the scores file),
        "test_targets"}.
    """
    from megavid.eval import linear_probe

    y = {name: labels.targets(d["meta"]) for name, d in (("train", train), ("val", val), ("test", test))}
    probe = linear_probe(train[FEATURE], y["train"], val[FEATURE], y["val"],
                         weight_decays=weight_decays, multilabel=labels.multilabel,
                         num_classes=labels.num_classes, max_iter=max_iter)
    return {
        "metrics": probe.score(test[FEATURE], y["test"]),
        "test_scores": probe.logits(test[FEATURE]), "test_targets": y["test"],
        "val_metrics": probe.score(val[FEATURE], y["val"]),
        "weight_decay": probe.weight_decay,
        "sweep": {str(k): v for k, v in probe.sweep.items()},
        "num_train": len(train["keys"]), "num_val": len(val["keys"]), "num_test": len(test["keys"]),
    }


def run_linear_probe(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid linear-probe`: probe a frozen checkpoint; writes
    ``<run_dir>/eval/linear_probe_<split>_step<N>.json`` (without a recorded step: named by the
    weights file's stem, ``_imported`` or ``_random``; :func:`megavid.eval.results.results_path`).

    Args:
        cfg: the resolved config (``task.cls`` for labels and the sweep; ``eval.checkpoint``,
            ``random`` for a randomly initialised encoder baseline).
        overwrite: replace an existing results file (else it is refused before probing), and
            re-extract features even when the cache matches.
        resume: the checkpoint to probe (default: eval.checkpoint, the run's latest, or the
            model config's imported weights in a run folder without weights).
    """
    from megavid.eval.results import results_path

    c = cfg.task.cls
    if not c.probe_weight_decays:
        raise ConfigError("task.cls.probe_weight_decays is empty; give the L2 sweep, e.g. [1e-2, 1e-4]")
    splits = {"train": cfg.data.train, "val": cfg.data.val, "test": cfg.eval.split}
    if splits["test"] in ("train", "val", cfg.data.train, cfg.data.val):
        raise ConfigError(f"eval.split={cfg.eval.split!r} is a split the probe is fitted or chosen "
                          "on; report on a held-out split (e.g. eval.split=test)")
    weights = select_eval_weights(cfg, resume, allow_random=True)
    out = results_path(cfg.run_dir, "linear_probe", cfg.eval.split, step=weights.step,
                       weights=weights.name, overwrite=overwrite)
    labels = build_label_space(cfg)
    task, model = open_eval(cfg, weights)
    feats = {name: get_split_features(cfg, task, model, name if name != "test" else cfg.eval.split,
                                      weights.path, cache=not overwrite)
             for name in splits}
    result = probe_features(feats["train"], feats["val"], feats["test"], labels,
                            weight_decays=list(c.probe_weight_decays), max_iter=c.probe_max_iter)
    scores, targets = result.pop("test_scores"), result.pop("test_targets")
    result.update({"split": cfg.eval.split, "feature": FEATURE, "labels": labels.to_dict(),
                   "chance": chance_levels(targets, labels)})
    if task.rank == 0:
        write_class_results(out, result, cfg, feats["test"]["keys"], scores, targets, labels,
                            weights.path, step=weights.step, imported=weights.imported)
        m = result["metrics"]
        print(f"linear probe ({weights.describe()}) on {result['num_test']} "
              f"clips of '{cfg.eval.split}': " + ", ".join(f"{k} {v:.1f}" for k, v in m.items())
              + f" (weight decay {result['weight_decay']:g}; chance {result['chance']})\nresults: {out}")
    return result


__all__ = ["FEATURE", "probe_features", "run_linear_probe"]
