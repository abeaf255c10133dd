"""Typed configuration: nested dataclasses, YAML config groups, dotted overrides, validation.

Precedence (lowest first): dataclass defaults < group files chosen by an experiment's
``defaults`` < the experiment's own values < group files named on the command line < YAML
files named on the command line < dotted overrides (``model.video.num_frames=8``).

Config groups live in ``configs/<group>/<name>.yaml``. A ``model``, ``data``, ``task``,
``optim``, ``train`` or ``eval`` file holds the values of that section; an ``experiment`` file
holds top-level sections plus an optional ``defaults:`` mapping of group -> name (Hydra style);
a ``pretrain`` or ``retrieval`` file (a recipe) holds top-level sections and is merged after
the section groups.

Unknown keys and wrong types raise :class:`ConfigError` naming the key and the closest valid
name; cross-field checks live in each dataclass's ``__post_init__``.

The dataclasses live in :mod:`megavid.config.model` (the ``model`` section) and
:mod:`megavid.config.sections` (the other sections and :class:`Config`), the composition in
:mod:`megavid.config.composition`; every public name is importable from here.
"""

from megavid.config.composition import (
    CONFIG_DIR,
    GROUPS,
    compose,
    deep_merge,
    from_dict,
    group_file,
    load_saved,
    to_dict,
    to_yaml,
)
from megavid.config.model import ModelConfig, TextEncoderConfig, VideoEncoderConfig
from megavid.config.sections import (
    ClassificationConfig,
    Config,
    DataConfig,
    EgocentricConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    SyntheticConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR",
    "ClassificationConfig",
    "Config",
    "DataConfig",
    "EgocentricConfig",
    "EvalConfig",
    "GROUPS",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SyntheticConfig",
    "TaskConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "VideoEncoderConfig",
    "compose",
    "deep_merge",
    "from_dict",
    "group_file",
    "load_saved",
    "to_dict",
    "to_yaml",
]
