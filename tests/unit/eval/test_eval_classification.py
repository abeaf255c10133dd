"""Top-k accuracy, multi-label mAP and zero-shot classifiers: hand-computed values, scikit-learn,
and a real sentence encoder (MiniLM-L6) for the prompt-template classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, top_k_accuracy_score

from megavid.errors import ConfigError, DataError
from megavid.eval.classification import (
    build_zeroshot_classifier,
    multilabel_map,
    per_class_average_precision,
    topk_accuracy,
)


def test_topk_accuracy_ties_count_against():
    logits = torch.tensor([[1.0, 1.0, 0.0],   # true 0 tied with class 1 -> rank 2
                           [0.0, 2.0, 1.0],   # true 2, class 1 above -> rank 2
                           [3.0, 2.0, 1.0]])  # true 0 -> rank 1
    m = topk_accuracy(logits, torch.tensor([0, 2, 0]), ks=(1, 2, 5))
    assert m["top1"] == pytest.approx(100 / 3)
    assert m["top2"] == 100.0 and m["top5"] == 100.0  # k > C: everything counts
    assert topk_accuracy(torch.zeros(4, 10), torch.arange(4), ks=(1, 9, 10)) == {
        "top1": 0.0, "top9": 0.0, "top10": 100.0}  # constant logits never look good


def test_topk_accuracy_matches_sklearn_without_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 12, (200,), generator=g)
    m = topk_accuracy(logits, labels, ks=(1, 5))
    for k in (1, 5):
        ref = top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=np.arange(12))
        assert m[f"top{k}"] == pytest.approx(100 * ref)


def test_multilabel_map_by_hand_with_a_class_without_positives():
    scores = torch.tensor([[0.9, 0.2, 0.5],
                           [0.8, 0.7, 0.5],
                           [0.3, 0.6, 0.5],
                           [0.1, 0.4, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    # class 0: positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: rank 1 -> 1;
    # class 2 has no positive: excluded from the mean (Charades convention), not counted as 0
    ap = per_class_average_precision(scores, targets)
    assert ap[0].item() == pytest.approx(5 / 6) and ap[1].item() == 1.0
    assert torch.isnan(ap[2])
    m = multilabel_map(scores, targets)
    assert m == {"mAP": pytest.approx(100 * (5 / 6 + 1) / 2), "num_classes": 2.0}
    # A sample without labels stays in: it is a negative for every class. Scored highest for
    # class 0, it pushes class 0's positives to ranks 2 and 4.
    m2 = multilabel_map(torch.cat([scores, torch.tensor([[1.0, 0.0, 0.0]])]),
                        torch.cat([targets, torch.zeros(1, 3, dtype=torch.long)]))
    assert m2["mAP"] == pytest.approx(100 * ((1 / 2 + 2 / 4) / 2 + 1) / 2)


def test_multilabel_map_matches_sklearn_and_edge_cases():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(60, 7, generator=g, dtype=torch.float64)
    targets = (torch.rand(60, 7, generator=g) < 0.3).long()
    targets[0] = 1  # every class has a positive
    ref = average_precision_score(targets.numpy(), scores.numpy(), average="macro")
    assert multilabel_map(scores, targets)["mAP"] == pytest.approx(100 * ref)
    assert multilabel_map(targets.double(), targets)["mAP"] == 100.0  # all correct
    with pytest.raises(DataError, match="positive"):
        multilabel_map(scores, torch.zeros_like(targets))
    with pytest.raises(ValueError, match="0 or 1"):
        multilabel_map(scores, targets * 2)


@pytest.mark.slow  # loads transformers and MiniLM (~5-10 s on 2 busy cores)
def test_zeroshot_classifier_is_the_average_of_normalised_template_embeddings(minilm_encode):
    classes = ["playing guitar", "riding a horse", "cooking pasta"]
    templates = ["a video of {}.", "a person {}.", "{}"]
    clf = build_zeroshot_classifier(minilm_encode, classes, templates, batch_size=4)
    assert clf.shape == (384, 3)
    assert torch.allclose(clf.norm(dim=0), torch.ones(3), atol=1e-6)
    # independent computation: every prompt in one call, then normalise / mean / normalise
    emb = F.normalize(minilm_encode([t.format(c) for c in classes for t in templates]), dim=-1)
    for c in range(len(classes)):
        expected = F.normalize(emb[c * 3 : c * 3 + 3].mean(0), dim=0)
        assert torch.allclose(clf[:, c], expected, atol=1e-5)
    # a real encoder puts paraphrases on their class
    queries = ["someone strums an acoustic guitar", "a rider gallops on horseback",
               "boiling spaghetti in a kitchen"]
    feats = F.normalize(minilm_encode(queries), dim=-1)
    assert topk_accuracy(feats @ clf, torch.arange(3), ks=(1,))["top1"] == 100.0


def test_zeroshot_classifier_rejects_bad_templates():
    with pytest.raises(ConfigError, match="exactly one"):
        build_zeroshot_classifier(lambda t: torch.ones(len(t), 2), ["a"], ["no slot"])
    with pytest.raises(ConfigError, match="class name"):
        build_zeroshot_classifier(lambda t: torch.ones(len(t), 2), [], ["{}"])
