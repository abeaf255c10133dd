"""``megavid make-shards``: videos + an annotation file (or video2dataset tars) -> validated
shards. Annotation readers, probe (the validation decode), transcode, the frames writer,
chunking, video2dataset ingest, and the job itself (:mod:`megavid.shards.ingest.make_shards`).
"""
