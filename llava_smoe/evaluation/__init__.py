"""Evaluation: lmms-eval integration, local offline tasks, exact-match accuracy, routing
analysis, run comparison.

Names load on first use: importing this package imports neither torch nor lmms-eval (20-30 s);
only `lmms_model`, `lmms_plugin` and `harness.run_eval` import lmms-eval.
"""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ExactMatchResult": "exact_match",
    "evaluate_exact_match": "exact_match",
    "InferenceRunner": "generation",
    "Prompt": "generation",
    "sampling_from_gen_kwargs": "generation",
    "QAItem": "questions",
    "export_parquet": "questions",
    "flatten_records": "questions",
    "load_questions": "questions",
    "RoutingReport": "routing",
    "analyze_routing": "routing",
    "plot_routing": "routing",
    "write_report": "routing",
    "normalize_answer": "vqa",
    "vqa_accuracy": "vqa",
    "compare_runs": "compare",
    "load_run": "compare",
})
