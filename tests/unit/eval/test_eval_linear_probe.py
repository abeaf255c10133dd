"""Linear probe against scikit-learn's LogisticRegression (same convex objective, so the same
optimum), and the weight-decay sweep on data where the right choice is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from megavid.errors import ConfigError, DataError
from megavid.eval.linear_probe import fit_linear_classifier, linear_probe


def _blobs(n: int, d: int, c: int, seed: int, sep: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * sep
    labels = torch.arange(n) % c
    return centers[labels] + torch.randn(n, d, generator=g), labels


def test_softmax_probe_matches_sklearn():
    feat, labels = _blobs(120, 6, 3, seed=0, sep=0.7)
    wd = 0.05
    probe = fit_linear_classifier(feat, labels, weight_decay=wd, standardize=False)
    ref = LogisticRegression(C=1 / (wd * len(labels)), tol=1e-10, max_iter=5000)
    ref.fit(feat.double().numpy(), labels.numpy())
    np.testing.assert_allclose(probe.weight.numpy(), ref.coef_, atol=1e-5)
    probs = torch.softmax(probe.logits(feat), dim=1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(feat.double().numpy()), atol=1e-6)


def test_multilabel_probe_matches_per_class_sklearn():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(100, 5, generator=g)
    targets = (feat[:, :3] + 0.8 * torch.randn(100, 3, generator=g) > 0).long()
    wd = 0.02
    probe = fit_linear_classifier(feat, targets, weight_decay=wd, multilabel=True,
                                  standardize=False)
    for c in range(3):
        ref = LogisticRegression(C=1 / (wd * 100), tol=1e-10, max_iter=5000)
        ref.fit(feat.double().numpy(), targets[:, c].numpy())
        np.testing.assert_allclose(probe.weight[c].numpy(), ref.coef_[0], atol=1e-5)
        np.testing.assert_allclose(probe.bias[c].item(), ref.intercept_[0], atol=1e-5)


def test_sweep_picks_a_weak_penalty_on_separable_data_and_scores_held_out():
    feat, labels = _blobs(300, 8, 4, seed=2, sep=1.0)
    tr, va, te = slice(0, 150), slice(150, 225), slice(225, 300)
    probe = linear_probe(feat[tr], labels[tr], feat[va], labels[va],
                         weight_decays=(10.0, 1e-3))
    # wd=10 shrinks the head to near-uniform predictions; 1e-3 fits the blobs
    assert set(probe.sweep) == {10.0, 1e-3}
    assert probe.weight_decay == 1e-3 and probe.sweep[1e-3] > probe.sweep[10.0]
    assert probe.score(feat[te], labels[te])["top1"] > 90.0
    # standardisation uses training statistics: scaling all features changes nothing
    scaled = linear_probe(feat[tr] * 100, labels[tr], feat[va] * 100, labels[va],
                          weight_decays=(1e-3,))
    assert torch.allclose(scaled.logits(feat[te] * 100), probe.logits(feat[te]), atol=1e-4)


def test_probe_input_errors():
    feat, labels = _blobs(10, 3, 2, seed=3)
    with pytest.raises(ConfigError, match="sweep is empty"):
        linear_probe(feat, labels, feat, labels, weight_decays=())
    bad = feat.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fit_linear_classifier(bad, labels, weight_decay=0.1)


def test_small_fits_run_on_one_thread_and_restore_the_setting(monkeypatch):
    """A small probe runs its L-BFGS closure on one intra-op thread (tiny ops; threads only
    add synchronisation) and leaves the process's thread count as it found it."""
    import importlib

    lp = importlib.import_module("megavid.eval.linear_probe")  # the package exports a function of that name

    seen: list[int] = []
    real = torch.nn.functional.cross_entropy

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(lp.F, "cross_entropy", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feat, labels = _blobs(40, 4, 2, seed=4)
        fit_linear_classifier(feat, labels, weight_decay=0.1, max_iter=5)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(lp, "SINGLE_THREAD_MACS", 1)  # every problem counts as large
        fit_linear_classifier(feat, labels, weight_decay=0.1, max_iter=5)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
