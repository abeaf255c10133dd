"""Loading: batches of decoded clips and tokenized captions out of shards.

The sample table and order (:mod:`~megavid.data.table`, :mod:`~megavid.data.order`), the
loader state and passes (:mod:`~megavid.data.loader`), sampling, transforms and text, one
module or package per decode backend (:mod:`~megavid.data.pyav_backend` with
:mod:`~megavid.data.workers`, :mod:`~megavid.data.decord_backend`, :mod:`megavid.data.dali`),
joint image-video batches (:mod:`~megavid.data.mixing`), and :mod:`megavid.data.build` on top
of them all (``build_loader``, the ``data.backend`` choice).

Of :mod:`megavid.shards` only the shard format (:mod:`megavid.shards.format`) is read here
(tests/unit/test_imports.py).
"""
