"""Open-ended QA answers are scored after one normalisation (lower-case, strip, inner whitespace
collapsed) on both sides, as the MSRVTT-QA / ActivityNet-QA exact match on their lower-case
answers; every expected number is written out by hand."""

from __future__ import annotations

import pytest

from megavid.eval.qa import majority_answer_baseline, normalize_answer, qa_accuracy


@pytest.mark.parametrize(("raw", "expected"), [
    ("Red", "red"),
    (" man ", "man"),
    ("  Red \t Sports\nCar ", "red sports car"),
    ("a man", "a man"),      # articles are kept: the benchmarks' exact match keeps them
    ("man.", "man."),        # so is punctuation
    ("2", "2"),
    (3, 3),                  # answer ids pass through
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_case_and_whitespace_differences_are_not_wrong_answers():
    pred = ["Red", " man ", "two", "dog"]
    answers = ["red", "man", "two", "cat"]
    types = ["what", "who", "how", "what"]
    # by hand: Red/red, " man "/man and two/two are right, dog/cat is wrong -> 3 of 4
    m = qa_accuracy(pred, answers, types)
    assert m["acc"] == 75.0 and m["num"] == 4.0
    assert (m["acc_what"], m["acc_who"], m["acc_how"]) == (50.0, 100.0, 100.0)
    assert 100.0 * sum(p == a for p, a in zip(pred, answers)) / 4 == 25.0  # raw == would say 25%
    # the ground truth side is normalised too
    assert qa_accuracy(["red"], ["  RED"])["acc"] == 100.0
    assert qa_accuracy(["a man"], ["man"])["acc"] == 0.0


def test_majority_baseline_counts_normalised_training_answers():
    # "Red"/"red "/"RED" are one answer (3 votes) against "blue" (2); counted raw, "blue" would
    # be the majority and the baseline would score 1 of 3
    base = majority_answer_baseline(["Red", "red ", "RED", "blue", "blue"], ["red", "blue", "Red"])
    assert base["acc"] == pytest.approx(200 / 3)
