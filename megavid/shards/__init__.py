"""Webdataset shards: the format (:mod:`megavid.shards.format`), the writer, verification,
stats, the synthetic dataset, and ingest (:mod:`megavid.shards.ingest`: annotations in, shards
out).

Nothing here imports the loaders (:mod:`megavid.data`), and the loaders import only
:mod:`megavid.shards.format` from here (tests/unit/test_imports.py).
"""
