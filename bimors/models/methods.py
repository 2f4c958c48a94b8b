"""Every prompt-learning method by its config name (``model.learner.method``)."""

from __future__ import annotations

from bimors.models.applenet import APPLeNet
from bimors.models.learners import BiMoRS, CoCoOp, CoOp, PromptLearner, ZeroShotCLIP
from bimors.models.maple import MaPLe

LEARNERS: dict[str, type[PromptLearner]] = {
    cls.method: cls for cls in (ZeroShotCLIP, CoOp, CoCoOp, BiMoRS, MaPLe, APPLeNet)
}
