"""Evaluation: lmms-eval integration, local offline tasks, exact-match accuracy, routing analysis.

Importing this package does not import lmms-eval (20-30 s); only `lmms_model`, `lmms_plugin`
and `harness.run_eval` do.
"""

from llava_smoe.evaluation.exact_match import ExactMatchResult, evaluate_exact_match
from llava_smoe.evaluation.generation import GenerationOptions, InferenceRunner, Prompt
from llava_smoe.evaluation.questions import QAItem, export_parquet, flatten_records, load_questions
from llava_smoe.evaluation.routing import RoutingReport, analyze_routing, plot_routing, write_report
from llava_smoe.evaluation.vqa import normalize_answer, vqa_accuracy

__all__ = [
    "ExactMatchResult",
    "GenerationOptions",
    "InferenceRunner",
    "Prompt",
    "QAItem",
    "RoutingReport",
    "analyze_routing",
    "evaluate_exact_match",
    "export_parquet",
    "flatten_records",
    "load_questions",
    "normalize_answer",
    "plot_routing",
    "vqa_accuracy",
    "write_report",
]
