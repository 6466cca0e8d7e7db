"""Benchmarks: MoE layer speed against a dense FFN and transformers' own MoE block (`moe`); the
sample cache and fused AdamW against their baselines (`training`). Each module imports torch
when used; `llava-smoe bench --help` does not."""
