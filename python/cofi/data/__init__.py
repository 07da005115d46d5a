"""cofi.data: tasks through ``datasets``, tokenisation, length-grouped batching, metrics."""
from .batching import epoch_batches, eval_batches, num_batches, rank_slice
from .encode import Encoded, encode_classification, encode_qa, qa_predictions
from .metrics import compute as compute_metrics, squad_scores
from .tasks import (
    TASKS,
    TaskError,
    TaskSpec,
    get_spec,
    labels_from,
    load_task,
    read_table,
    rotten_tomatoes_splits,
)
from .task_record import label_map_from_record, remember_task, spec_from_record, task_record
from .tokenizer import TokenizerError, load_tokenizer

__all__ = ["TASKS", "Encoded", "TaskError", "TaskSpec", "TokenizerError", "compute_metrics", "encode_classification",
           "encode_qa", "epoch_batches", "eval_batches", "get_spec", "label_map_from_record", "labels_from", "load_task",
           "load_tokenizer", "num_batches", "qa_predictions", "rank_slice", "read_table", "remember_task",
           "rotten_tomatoes_splits", "spec_from_record", "squad_scores", "task_record"]
