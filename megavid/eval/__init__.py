"""Evaluation: pure tensor metrics (retrieval, QA, classification, EK-100, EgoMCQ), reranking,
low-resource scoring, linear probing, distributed feature gathering and the results JSON.

The engine and the tasks decide when these run; nothing here touches models, loaders or
DeepSpeed. Conventions (percentages, ties counted against the model) are in
:mod:`megavid.eval.metrics`.
"""

from megavid.eval.classification import (
    DEFAULT_VIDEO_TEMPLATES,
    build_zeroshot_classifier,
    multilabel_map,
    per_class_average_precision,
    topk_accuracy,
)
from megavid.eval.gather import gather_features, gather_objects, get_eval_shard
from megavid.eval.linear_probe import LinearProbe, fit_linear_classifier, linear_probe
from megavid.eval.metrics import ap_and_ndcg, average_precision, ndcg, rank_summary
from megavid.eval.qa import (
    egomcq_accuracy,
    majority_answer_baseline,
    multiple_choice_accuracy,
    multiple_choice_correct,
    qa_accuracy,
)
from megavid.eval.results import file_sha256, get_software_versions, verify_results, write_results
from megavid.eval.retrieval import (
    compute_similarity,
    ek100_mir_metrics,
    evaluate_retrieval,
    rerank_topk,
    retrieval_chance,
    retrieval_metrics,
    retrieval_ranks,
    score_retrieval,
)

__all__ = [
    "DEFAULT_VIDEO_TEMPLATES",
    "LinearProbe",
    "ap_and_ndcg",
    "fit_linear_classifier",
    "linear_probe",
    "average_precision",
    "build_zeroshot_classifier",
    "compute_similarity",
    "egomcq_accuracy",
    "ek100_mir_metrics",
    "evaluate_retrieval",
    "file_sha256",
    "gather_features",
    "gather_objects",
    "get_eval_shard",
    "get_software_versions",
    "majority_answer_baseline",
    "multilabel_map",
    "multiple_choice_accuracy",
    "multiple_choice_correct",
    "ndcg",
    "per_class_average_precision",
    "qa_accuracy",
    "rank_summary",
    "rerank_topk",
    "retrieval_chance",
    "retrieval_metrics",
    "retrieval_ranks",
    "score_retrieval",
    "topk_accuracy",
    "verify_results",
    "write_results",
]
