"""Suite-wide settings: nothing may reach a model or dataset hub; CPU threads are pinned so
that timings and numerics do not depend on the machine's load."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
