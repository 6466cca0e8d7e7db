"""Training engine: recipes, tasks, one loop over two back ends (PyTorch / DeepSpeed).

Import-light on purpose: names load on first use, and DeepSpeed and TensorBoard are imported
only where they are used.
"""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "OptimConfig": "config",
    "ParamGroupConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "load_recipe": "recipe",
    "parse_overrides": "recipe",
    "TaskParts": "tasks",
    "available_tasks": "tasks",
    "get_task": "tasks",
    "register_task": "tasks",
})
