"""Class lists for the classification jobs (``task.cls.class_file``), read beside the annotation
readers: plain names one per line, or Charades' ``c000 Holding some clothes`` lines whose ids
(the ids of the ``actions`` column, parsed by the same pattern) stand for the class too.

Oracle: the class list written here and the indices expected by hand.
"""

from __future__ import annotations

import pytest

from megavid.errors import ConfigError, DataError
from megavid.shards.ingest.dataset_annotations import parse_charades_actions
from megavid.shards.ingest.labels import read_class_file


def test_charades_class_list_names_and_ids(tmp_path) -> None:
    p = tmp_path / "Charades_v1_classes.txt"
    p.write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n\nc002 Taking a towel\n")
    names, alias = read_class_file(p)
    assert names == ["Holding some clothes", "Putting clothes somewhere", "Taking a towel"]
    assert alias == {"c000": 0, "Holding some clothes": 0, "c001": 1, "Putting clothes somewhere": 1,
                     "c002": 2, "Taking a towel": 2}
    # an action's class id is the id the class list gives
    actions = parse_charades_actions("c002 1.0 2.5;c000 0.0 1.0", "x.csv:2")
    assert [alias[c] for c, _, _ in actions] == [2, 0]


def test_plain_names_are_whole_lines(tmp_path) -> None:
    p = tmp_path / "classes.txt"
    p.write_text("jumping jacks\nx1 not an id\npush up\n")
    names, alias = read_class_file(p)
    assert names == ["jumping jacks", "x1 not an id", "push up"]
    assert alias == {n: i for i, n in enumerate(names)}


def test_missing_or_empty_class_file_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task.cls.class_file=.*does not exist"):
        read_class_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no class names"):
        read_class_file(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="not 'cNNN start end'"):
        parse_charades_actions("x092 1 2", "x.csv:2")
