"""NVIDIA DALI backend: decode clips out of webdataset shards on the CPU or the GPU.

The pipeline, per batch::

    external source (encoded video bytes, frame indices, crop box, flip)   <- megavid, in Python
      -> fn.decoders.video(frames=...)      CPU: VP8/VP9/MJPEG; "mixed" (NVDEC): + H.264/HEVC/AV1
      -> fn.resize(roi_start, roi_end)      crop box and resize to img_size^2 in one resampling
      -> fn.flip(horizontal=...)            caption-aware flip, decided per sample
      -> fn.transpose(FHWC -> FCHW)         uint8 [B, T, C, H, W]

Why an external source and not ``fn.readers.webdataset``: the reader walks each rank's
contiguous slice of the samples in file order (or a buffer shuffle of its own), cannot start
at a cursor and cannot follow megavid's per-epoch permutation from (seed, epoch). The loader
contract needs both (a resumed run neither repeats nor skips a sample, whatever the world
size) and needs the frames, crop and flip that the PyAV backend draws from the same per-sample
generators (:mod:`megavid.data.sampling`, :mod:`megavid.data.transforms`). So megavid plans each
batch in Python, the *feed stage* (cheap: a read of the JSON and one of the video member or of
the clip's adjacent frames, at the member offsets of the shard's ``index.jsonl``; the
``NNNNN.idx`` files describe the same offsets), in ``data.feed_workers`` processes ahead of
the pipeline, and DALI does the expensive part: decoding, resampling, flipping.
``fn.decoders.video``'s ``frames`` argument takes per-sample frame indices, so no frame is
decoded into the batch that the clip does not use.

One pipeline per loader: every pass (epoch, evaluation pass, resampled chunk) flows through
the same pipeline and external source, whose source serves one continuous sequence of work
items (the pass and step each batch belongs to) planned ahead; a batch carries its work item,
so a pass boundary is exact even with batches of the next pass already in flight. Only a
quarantine event rebuilds the pipeline.

DALI has no per-sample error handling: one corrupt video fails the whole batch, and the
pipeline is unusable afterwards. ``DaliLoader`` then decodes the failed batch's samples one
by one in a 1-sample pipeline of the same kind, names each culprit (shard, key, DALI's message),
adds it to a ``Quarantine`` (a JSON file when ``data.quarantine`` or a path is given),
rebuilds the pipeline and prepares the batches in flight again; a quarantined sample is replaced by the
rule of the PyAV loader (:func:`megavid.data.order.fill_rank_batch`: never a sample already in
the global step or the batch, chosen deterministically from (seed, epoch, position)), so both
backends give the same batches. Bad samples are counted and logged by the PyAV loader's rules
(each distinct one once per epoch in ``failures``, logged once) when a batch that met them is
handed out, not when DALI prefetches it; the quarantine (kept across epochs, and across runs
when it is a file) spares decoding them again.

The same loader reads frames shards (``FramesDaliLoader``: T JPEGs per clip) and image
shards (``ImageDaliLoader``: one JPEG/PNG per sample, a 1-frame clip repeated to T) with
``fn.decoders.image``, and runs ``data.resampled`` (infinite, with replacement) mode: the
order, cursor and state are :class:`megavid.data.loader.VideoTextLoader`'s, which hands each
pass (an epoch from the cursor, or a resampled chunk) to ``_iter_plan``.

Modules (no module imports nvidia.dali at import time; the pipelines import it when built):

- ``devices``: is DALI installed, the shards' codec, the decoder device ('cpu' or 'mixed');
- ``plan``: per-sample frame indices, crop box and flip (the PyAV path's draws);
- ``pipelines``: the video and JPEG pipelines, DALI output to torch, DALI's error messages;
- ``quarantine``: the samples DALI failed to decode;
- ``feed``: the feed stage's work items, its worker processes and their shared-memory rings;
- ``stream``: the pipeline of a loader's whole life and the work items in flight through it;
- ``loader``: ``DaliLoader`` (video shards): reading and planning, fault isolation, ``stats()``;
- ``measure``: the feed and decode stages measured apart (``megavid bench-loader``);
- ``image_loaders``: ``FramesDaliLoader`` (frames shards) and ``ImageDaliLoader`` (images);
- ``readers``: DALI's own ``fn.readers.webdataset`` over a shard folder (``megavid info``);
- ``backend``: ``build_dali_loader``, which picks the loader for the shards.
"""
