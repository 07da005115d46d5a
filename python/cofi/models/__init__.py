"""cofi.models: BERT / RoBERTa encoders with CoFi masks for classification and extractive QA.

``forward(..., masks=Masks, backend="compact" | "dense")``: compact runs only the live units of the
step's masks (one host copy of the masks per step); dense is the reference's dense-masked method.
"""
from .encoder import CoFiEncoder
from .modeling import (
    CoFiBertForQuestionAnswering,
    CoFiBertForSequenceClassification,
    CoFiOutput,
    CoFiPreTrainedModel,
    CoFiRobertaForQuestionAnswering,
    CoFiRobertaForSequenceClassification,
    model_class_for,
)
from .plan import ALWAYS_GATHER, CompactPolicy, StepPlan, make_plan

__all__ = [
    "ALWAYS_GATHER", "CoFiBertForQuestionAnswering", "CoFiBertForSequenceClassification", "CoFiEncoder",
    "CoFiOutput", "CoFiPreTrainedModel", "CoFiRobertaForQuestionAnswering", "CoFiRobertaForSequenceClassification",
    "CompactPolicy", "StepPlan", "make_plan", "model_class_for",
]
