"""QA accuracy per type, multiple choice, the majority baseline and EgoMCQ, by hand."""

from __future__ import annotations

import pytest
import torch

from megavid.eval.qa import (
    egomcq_accuracy,
    majority_answer_baseline,
    multiple_choice_accuracy,
    multiple_choice_correct,
    qa_accuracy,
)


def test_qa_accuracy_overall_and_per_type():
    pred = ["red", "circle", "left", "left", "fast"]
    answers = ["red", "square", "left", "right", "fast"]
    types = ["colour", "shape", "direction", "direction", "speed"]
    m = qa_accuracy(pred, answers, types)
    assert m["acc"] == 60.0 and m["num"] == 5
    assert m["acc_colour"] == 100.0 and m["acc_shape"] == 0.0
    assert m["acc_direction"] == 50.0 and m["num_direction"] == 2
    ids = qa_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0]))  # answer ids work too
    assert ids["acc"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="predictions"):
        qa_accuracy(["a"], ["a", "b"])


def test_multiple_choice_ties_are_wrong_answers():
    scores = [[0.2, 0.2, 0.1],   # correct 0 tied with 1 -> wrong
              [0.1, 0.9, 0.3],   # correct 1 -> right
              [0.5, 0.4]]        # only two choices (padded with -inf); correct 1 -> wrong
    assert multiple_choice_correct(scores, [0, 1, 1]).tolist() == [False, True, False]
    assert multiple_choice_accuracy(scores, [0, 1, 1]) == pytest.approx(100 / 3)
    assert multiple_choice_accuracy(torch.eye(4), torch.arange(4)) == 100.0
    per_type = qa_accuracy(multiple_choice_correct(scores, [0, 1, 0]), [True] * 3, ["a", "a", "b"])
    assert per_type["acc_a"] == 50.0 and per_type["acc_b"] == 100.0
    with pytest.raises(ValueError, match="NaN"):
        multiple_choice_accuracy([[float("nan"), 0.0]], [0])


def test_majority_baseline_overall_and_per_type():
    train = ["red", "red", "blue", "left", "left", "right"]
    train_types = ["colour"] * 3 + ["direction"] * 3
    test = ["red", "blue", "left", "right", "red"]
    test_types = ["colour", "colour", "direction", "direction", "shape"]
    # overall: "red" and "left" both appear twice -> tie to the smaller string, "left"
    overall = majority_answer_baseline(train, test)
    assert overall["acc"] == 20.0  # only test[2] == "left"
    # per type: colour -> red, direction -> left, shape (unseen) -> overall "left"
    typed = majority_answer_baseline(train, test, train_types=train_types, test_types=test_types)
    assert typed["acc"] == 40.0
    assert typed["acc_colour"] == 50.0 and typed["acc_direction"] == 50.0
    assert typed["acc_shape"] == 0.0
    # the tie-break does not depend on the order of the training answers
    assert majority_answer_baseline(list(reversed(train)), test) == overall


def test_egomcq_inter_and_intra():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.0],  # inter, correct 0 -> right
        [0.1, 0.8, 0.2, 0.3, 0.0],  # inter, correct 2 -> wrong
        [0.5, 0.5, 0.1, 0.1, 0.1],  # intra, correct 0 tied with 1 -> wrong
        [0.1, 0.2, 0.3, 0.4, 0.5],  # intra, correct 4 -> right
        [0.1, 0.2, 0.3, 0.4, 0.5],  # intra, correct 3 -> wrong
    ])
    correct = torch.tensor([0, 2, 0, 4, 3])
    expected = {"inter_acc": 50.0, "num_inter": 2.0, "intra_acc": pytest.approx(100 / 3),
                "num_intra": 3.0}
    names = ["inter", "inter", "intra", "intra", "intra"]
    assert egomcq_accuracy(scores, correct, names) == expected
    codes = torch.tensor([1, 1, 2, 2, 2])  # EgoVLP's integer codes
    assert egomcq_accuracy(scores, correct, codes) == expected
    with pytest.raises(ValueError, match="inter"):
        egomcq_accuracy(scores, correct, ["x"] * 5)
