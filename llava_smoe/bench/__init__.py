"""Benchmarks: MoE layer speed against a dense FFN and transformers' own MoE block; the sample
cache and fused AdamW against their baselines (`training`)."""

from .moe import DenseSwiGLU, MoEBenchConfig, build_hf_block, check_hf_equivalence, markdown_table, run_moe_bench

__all__ = ["DenseSwiGLU", "MoEBenchConfig", "build_hf_block", "check_hf_equivalence", "markdown_table", "run_moe_bench"]
