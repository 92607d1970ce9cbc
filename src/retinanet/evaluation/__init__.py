"""How good a model is, in one place: COCO metrics (pycocotools), Pascal VOC mAP, the TIDE error decomposition, the
HTML report, and a model evaluated on a dataset, the one path of `retinanet eval`, a training run's validation, the
ablations and the loss analysis."""

from retinanet.data.coco_format import coco_ground_truth, coco_results, save_coco_results
from retinanet.evaluation.coco import CocoMetrics, evaluate_coco, max_dets_for, plot_pr_curves
from retinanet.evaluation.dataset import evaluate_model, evaluate_predictions, predict_dataset
from retinanet.evaluation.errors import ERROR_TYPES, ErrorAnalysis, analyze_errors
from retinanet.evaluation.report import report_dataset, write_report
from retinanet.evaluation.validation import selection_score, validate, validation_lines
from retinanet.evaluation.voc import average_precision, evaluate_voc

__all__ = [
    "ERROR_TYPES",
    "CocoMetrics",
    "ErrorAnalysis",
    "analyze_errors",
    "average_precision",
    "coco_ground_truth",
    "coco_results",
    "evaluate_coco",
    "evaluate_model",
    "evaluate_predictions",
    "evaluate_voc",
    "max_dets_for",
    "plot_pr_curves",
    "predict_dataset",
    "report_dataset",
    "save_coco_results",
    "selection_score",
    "validate",
    "validation_lines",
    "write_report",
]
