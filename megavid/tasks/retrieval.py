"""Text-video retrieval finetuning: the pretraining objectives (VTC, VTM with hard negatives)
on a retrieval dataset, evaluated by VTC retrieval re-ranked by the VTM head (BLIP's k_test)."""

from __future__ import annotations

from torch import nn

from megavid.config import Config
from megavid.tasks.base import train_task
from megavid.tasks.pretrain import PretrainTask


class RetrievalTask(PretrainTask):
    """Same forward as pretraining; evaluation adds VTM re-ranking of the top-k candidates."""

    task_name = "retrieval"

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from megavid.tasks.zeroshot import evaluate_retrieval

        loader = self.build_eval_loader(self.cfg.data.val, self.rank, self.world_size)
        k = self.cfg.eval.k_test if self.cfg.model.vtm_weight > 0 else 0
        return evaluate_retrieval(model, loader, self, k_test=k)["metrics"]


def run_finetune_retrieval(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """`megavid finetune-retrieval`: trains the retrieval task (task.name=retrieval)."""
    return train_task(cfg, RetrievalTask, "finetune-retrieval", overwrite=overwrite, resume=resume).summary
