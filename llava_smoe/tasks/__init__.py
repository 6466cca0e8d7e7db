"""The training tasks that ship with the package, one module each: `vlm` (the multimodal stages),
`clip` (contrastive tower pretraining), `lm` (language-model pretraining). Each registers itself
with `llava_smoe.training.tasks` when a recipe names it."""
