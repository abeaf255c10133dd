"""TimeSformer variants by name are the model configs: every ``configs/model/*.yaml`` is a
variant of the same name whose tower has that file's sizes.

Oracle: the YAML files read here with ``yaml.safe_load`` (not through megavid's composition),
and the sizes read back from the built modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megavid.models.variants import TIMESFORMER_VARIANTS, create_timesformer

MODEL_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "model").glob("*.yaml"))


def test_the_variants_are_the_model_configs_and_the_test_tower() -> None:
    assert MODEL_CONFIGS, "no model configs found"
    assert set(TIMESFORMER_VARIANTS) == {p.stem for p in MODEL_CONFIGS} | {"timesformer_tiny_test"}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_a_variant_has_its_config_sizes(path: Path) -> None:
    video = yaml.safe_load(path.read_text())["video"]
    tower = create_timesformer(path.stem)
    patch = video["patch_size"]
    built = {"img_size": tower.patch_embed.grid * patch, "patch_size": tower.patch_embed.patch_size,
             "num_frames": tower.time_embed.shape[1], "embed_dim": tower.embed_dim,
             "depth": len(tower.blocks), "num_heads": tower.blocks[0].attn.num_heads,
             "mlp_ratio": tower.blocks[0].mlp.fc1.out_features / tower.embed_dim}
    assert {k: built[k] for k in video} == video
