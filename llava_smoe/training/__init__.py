"""Training engine: recipes, tasks, one loop over two back ends (PyTorch / DeepSpeed).

Import-light on purpose: DeepSpeed and TensorBoard are imported only where they are used.
"""

from llava_smoe.training.config import ConfigError, OptimConfig, ParamGroupConfig, RunConfig, TrainConfig
from llava_smoe.training.recipe import load_recipe, parse_overrides
from llava_smoe.training.tasks import TaskParts, available_tasks, get_task, register_task

__all__ = [
    "ConfigError",
    "OptimConfig",
    "ParamGroupConfig",
    "RunConfig",
    "TaskParts",
    "TrainConfig",
    "available_tasks",
    "get_task",
    "load_recipe",
    "parse_overrides",
    "register_task",
]
