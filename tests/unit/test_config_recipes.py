"""Config groups of whole-config recipes (``pretrain=NAME``, ``retrieval=NAME``) and the
egocentric benchmark files in their own section (``task.ego``; the old ``task.cls`` names are
refused with the new one).

Oracles: the same recipe passed as a file by its path (the way it was always used), and the
YAML files read here with ``yaml.safe_load``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megavid.config import compose
from megavid.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL = {"pretrain": "timesformer_tiny", "retrieval": "timesformer_base"}
"""The model group each recipe's comment runs it with."""
RECIPES = [(g, p) for g in MODEL for p in sorted((CONFIGS / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, path", RECIPES, ids=lambda x: x if isinstance(x, str) else x.stem)
def test_a_recipe_by_name_equals_the_recipe_file(group: str, path: Path) -> None:
    by_name = compose([f"model={MODEL[group]}", f"{group}={path.stem}"])
    assert by_name == compose([f"model={MODEL[group]}", str(path)])
    # the recipe's own values win over the model group's (e.g. the 32-frame retrieval clips)
    recipe = yaml.safe_load(path.read_text())
    assert by_name.run.name == recipe["run"]["name"] and by_name.task.name == recipe["task"]["name"]
    for key, value in (recipe.get("model", {}).get("video") or {}).items():
        assert getattr(by_name.model.video, key) == value


def test_unknown_recipe_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="no config 'nope' in group 'retrieval'.*msrvtt"):
        compose(["retrieval=nope"])


@pytest.mark.parametrize("key", ["relevancy", "relevancy_texts", "relevancy_videos", "egomcq"])
def test_egocentric_keys_moved_to_task_ego(key: str, tmp_path) -> None:
    assert getattr(compose([f"task.ego.{key}=x.csv"]).task.ego, key) == "x.csv"
    message = f"config key 'task.cls.{key}' moved to 'task.ego.{key}'; rename it"
    with pytest.raises(ConfigError) as e:
        compose([f"task.cls.{key}=x.csv"])
    assert str(e.value) == message
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"task": {"cls": {key: "x.csv"}}}))
    with pytest.raises(ConfigError) as e:
        compose([str(old)])
    assert str(e.value) == message


def test_the_egocentric_task_configs_fill_task_ego() -> None:
    for name in ("ek100_mir", "egomcq"):
        files = yaml.safe_load((CONFIGS / "task" / f"{name}.yaml").read_text())["ego"]
        ego = compose([f"task={name}"]).task.ego
        assert files and {k: getattr(ego, k) for k in files} == files
