"""`llava-smoe plan`: what a recipe's model needs, per GPU, before a GPU is at hand.

`planner.plan_recipe` resolves the model the recipe trains (`resolve.py`: built on the meta
device, no weights, following the chain of stages) and applies the arithmetic of
`estimate.py`: parameters by component, model states per GPU without ZeRO and under ZeRO-2 /
ZeRO-3, activations per sample with and without gradient checkpointing (router and competition
steps), FLOPs per token weighted by the competition schedule, and the largest micro-batch that
fits. Names load on first use, so `llava-smoe --help` imports no torch.
"""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "PlanSettings": "planner",
    "format_plan": "planner",
    "plan_model": "planner",
    "plan_recipe": "planner",
    "resolve_recipe": "resolve",
})
