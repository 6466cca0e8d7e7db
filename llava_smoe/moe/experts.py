"""Experts stored batched as 3-D weights, and the ways to run them.

Weights follow the `x @ W` orientation so grouped GEMM takes them as they are:
SwiGLU experts hold `w_gate_up_EDF2` ([E, D, 2F], gate then up) and `w_down_EFD`;
GELU experts hold `w_fc1_EDF`, `w_fc2_EFD` and optional biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FFN_KINDS

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}

HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(dtype: torch.dtype, *dims: int) -> bool:
    """grouped_mm takes fp32/bf16/fp16 with every row stride a multiple of 16 bytes."""
    if not HAS_GROUPED_MM or dtype not in GROUPED_MM_DTYPES:
        return False
    return all((d * dtype.itemsize) % 16 == 0 for d in dims)


def activation_fn(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


class _SiLUGLU(torch.autograd.Function):
    """`silu(gate) * up` of `h = [gate | up]`, whose backward writes both halves of one gradient
    buffer: autograd's `chunk` would allocate the two and concatenate them (a copy of [P, 2F])."""

    @staticmethod
    def forward(ctx, h_P2F: torch.Tensor) -> torch.Tensor:
        gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
        silu_PF = F.silu(gate_PF)
        ctx.save_for_backward(gate_PF, up_PF, silu_PF)
        return silu_PF * up_PF

    @staticmethod
    def backward(ctx, grad_PF: torch.Tensor) -> torch.Tensor:
        gate_PF, up_PF, silu_PF = ctx.saved_tensors
        grad_P2F = grad_PF.new_empty(*grad_PF.shape[:-1], 2 * grad_PF.shape[-1])
        grad_gate_PF, grad_up_PF = grad_P2F.chunk(2, dim=-1)
        torch.mul(grad_PF, silu_PF, out=grad_up_PF)
        # grad * up goes into the gate half, and silu's backward rewrites it there in place.
        torch.mul(grad_PF, up_PF, out=grad_gate_PF)
        torch.ops.aten.silu_backward.grad_input(grad_gate_PF, gate_PF, grad_input=grad_gate_PF)
        return grad_P2F


def silu_glu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's hidden transform on gate and up fused in one tensor (last dim: gate, then up)."""
    return _SiLUGLU.apply(h)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects stride-0 gradients (e.g. from `.sum()`).
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


@torch.compiler.disable  # its fake-tensor rule rejects fp32, which its CPU kernel runs
def _grouped_mm(x_PK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x_PK, w_EKN, offs=offsets_E)


def _loop_mm(x_PK: torch.Tensor, w_EKN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = [chunk @ w_EKN[e] for e, chunk in enumerate(torch.split(x_PK, counts)) if counts[e] > 0]
    if not outs:
        return x_PK.new_zeros(0, w_EKN.shape[-1])
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """E independent FFNs of one shape, run on tokens sorted by expert or on every token."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        ffn_kind: str = "swiglu",
        activation: str = "silu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if ffn_kind not in FFN_KINDS:
            raise ValueError(f"ffn_kind must be one of {FFN_KINDS}, got {ffn_kind!r}")
        if ffn_kind == "swiglu" and bias:
            raise ValueError("SwiGLU experts are bias-free (as in Llama, Qwen and Phi-3); use bias=False")
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.ffn_kind, self.activation, self.bias = ffn_kind, activation, bias
        self.act = activation_fn(activation)
        E, D, Fd = num_experts, hidden_size, ffn_size
        if ffn_kind == "swiglu":
            self.w_gate_up_EDF2 = nn.Parameter(torch.empty(E, D, 2 * Fd))
            self.w_down_EFD = nn.Parameter(torch.empty(E, Fd, D))
        else:
            self.w_fc1_EDF = nn.Parameter(torch.empty(E, D, Fd))
            self.w_fc2_EFD = nn.Parameter(torch.empty(E, Fd, D))
            if bias:
                self.b_fc1_EF = nn.Parameter(torch.zeros(E, Fd))
                self.b_fc2_ED = nn.Parameter(torch.zeros(E, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith("w_"):
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))
            else:
                nn.init.zeros_(p)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
            f"kind={self.ffn_kind}, activation={self.activation}, bias={self.bias}"
        )

    # -- the hidden transform between the two matmuls -------------------------------------------
    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.ffn_kind == "swiglu" and self.act is F.silu:
            return silu_glu(h)
        if self.ffn_kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    @property
    def w_in(self) -> torch.Tensor:
        return self.w_gate_up_EDF2 if self.ffn_kind == "swiglu" else self.w_fc1_EDF

    @property
    def w_out(self) -> torch.Tensor:
        return self.w_down_EFD if self.ffn_kind == "swiglu" else self.w_fc2_EFD

    # -- tokens already sorted by expert ---------------------------------------------------------
    def forward_sorted(self, x_PD: torch.Tensor, counts_E: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        """Run each expert on its contiguous slice of `x_PD` (`counts_E[e]` rows for expert e)."""
        w_in, w_out = self.w_in, self.w_out
        x_PD = x_PD.to(w_in.dtype)
        if impl == "grouped":
            offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
            h_PF = _contiguous_grad(_grouped_mm(x_PD, w_in, offsets_E))
            if self.bias:
                h_PF = h_PF + self.b_fc1_EF.repeat_interleave(counts_E, dim=0, output_size=x_PD.shape[0])
            y_PD = _contiguous_grad(_grouped_mm(self._hidden(h_PF), w_out, offsets_E))
        elif impl == "loop":
            counts = counts_E.tolist()
            h_PF = _loop_mm(x_PD, w_in, counts)
            if self.bias:
                h_PF = h_PF + self.b_fc1_EF.repeat_interleave(counts_E, dim=0, output_size=x_PD.shape[0])
            y_PD = _loop_mm(self._hidden(h_PF), w_out, counts)
        else:
            raise ValueError(f"unknown expert execution {impl!r}; use 'grouped' or 'loop'")
        if self.bias:
            y_PD = y_PD + self.b_fc2_ED.repeat_interleave(counts_E, dim=0, output_size=x_PD.shape[0])
        return y_PD

    # -- every expert on its own batch of rows ---------------------------------------------------
    def forward_batched(self, x_END: torch.Tensor) -> torch.Tensor:
        """Expert e runs on `x_END[e]`: a plain batched matmul (used by competition and MoT)."""
        w_in, w_out = self.w_in, self.w_out
        h_ENF = torch.bmm(x_END.to(w_in.dtype), w_in)
        if self.bias:
            h_ENF = h_ENF + self.b_fc1_EF[:, None, :]
        y_END = torch.bmm(self._hidden(h_ENF), w_out)
        if self.bias:
            y_END = y_END + self.b_fc2_ED[:, None, :]
        return y_END

    def forward_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, each expert evaluated once: [T, E, D]."""
        x_ETD = x_TD.unsqueeze(0).expand(self.num_experts, -1, -1)
        return self.forward_batched(x_ETD).transpose(0, 1)

    def forward_expert(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        """One expert alone, written out plainly: the reference the fast paths are tested against."""
        h = x_ND.to(self.w_in.dtype) @ self.w_in[e]
        if self.bias:
            h = h + self.b_fc1_EF[e]
        y = self._hidden(h) @ self.w_out[e]
        if self.bias:
            y = y + self.b_fc2_ED[e]
        return y


def dispatch_pairs(
    experts: GroupedExperts,
    x_TD: torch.Tensor,
    token_P: torch.Tensor,
    expert_P: torch.Tensor,
    weight_P: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    """Sum `weight * FFN_expert(x_token)` over (token, expert, weight) pairs.

    Pairs are sorted by expert so every expert sees one contiguous block (grouped GEMM or the
    loop), then results are scattered back with an index-add. Empty experts are simply empty
    blocks. Gradients reach both the experts and `weight_P`.
    """
    order_P = torch.argsort(expert_P, stable=True)
    token_sorted_P = token_P[order_P]
    counts_E = torch.bincount(expert_P, minlength=experts.num_experts)
    y_PD = experts.forward_sorted(x_TD[token_sorted_P], counts_E, impl)
    y_PD = y_PD * weight_P[order_P].unsqueeze(-1).to(y_PD.dtype)
    out_TD = torch.zeros(x_TD.shape, dtype=y_PD.dtype, device=x_TD.device)
    return out_TD.index_add_(0, token_sorted_P, y_PD)


class _GatherSorted(torch.autograd.Function):
    """`x_TD[order_P // K]`: each token's K copies, in expert-sorted order.

    The autograd default scatter-adds the gradient back (slow and serial on CPU); the inverse
    permutation turns it into a gather that sums each token's K copies as it reads them
    (`embedding_bag`, one pass, no [T, K, D] intermediate).
    """

    @staticmethod
    def forward(ctx, x_TD, token_sorted_P, inverse_P, K):
        ctx.save_for_backward(inverse_P)
        ctx.T, ctx.K = x_TD.shape[0], K
        return x_TD.index_select(0, token_sorted_P)

    @staticmethod
    def backward(ctx, grad_PD):
        (inverse_P,) = ctx.saved_tensors
        return F.embedding_bag(inverse_P.view(ctx.T, ctx.K), grad_PD, mode="sum"), None, None, None


class _CombineSorted(torch.autograd.Function):
    """`out_TD[t] = sum_j weights_TK[t, j] * y_PD[inverse_P[t * K + j]]`: the weighted sum of each
    token's K expert outputs, read from expert-sorted order in one pass (`embedding_bag` with
    per-sample weights) instead of un-permuting into [T, K, D] and multiplying.

    Backward, in sorted order: the output gradient gathered once per pair gives both the pairs'
    gradient (times their weight) and the weights' gradient (its dot with the pair's output).
    """

    @staticmethod
    def forward(ctx, y_PD, weights_TK, inverse_P, token_sorted_P, order_P):
        T, K = weights_TK.shape
        ctx.save_for_backward(y_PD, weights_TK, inverse_P, token_sorted_P, order_P)
        return F.embedding_bag(inverse_P.view(T, K), y_PD, mode="sum", per_sample_weights=weights_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, weights_TK, inverse_P, token_sorted_P, order_P = ctx.saved_tensors
        grad_PD = grad_TD.index_select(0, token_sorted_P)
        grad_weights_P = (grad_PD * y_PD).sum(-1).index_select(0, inverse_P)  # back to pair order t * K + j
        grad_PD.mul_(weights_TK.reshape(-1).index_select(0, order_P).unsqueeze(-1))
        return grad_PD, grad_weights_P.view_as(weights_TK), None, None, None


class _PermuteRows(torch.autograd.Function):
    """`x_PD[perm_P]` for a permutation: the backward gathers with the inverse instead of scattering."""

    @staticmethod
    def forward(ctx, x_PD, perm_P, inverse_P):
        ctx.save_for_backward(inverse_P)
        return x_PD.index_select(0, perm_P)

    @staticmethod
    def backward(ctx, grad_PD):
        (inverse_P,) = ctx.saved_tensors
        return grad_PD.index_select(0, inverse_P), None, None


def dispatch_topk(
    experts: GroupedExperts,
    x_TD: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    """`sum_j weights_TK[t, j] * FFN_{expert_idx_TK[t, j]}(x_t)`: exactly k experts per token.

    The same sort-by-expert execution as `dispatch_pairs`, but with a fixed k per token every
    scatter becomes a gather through the inverse permutation, and the weighted sum over a
    token's k outputs is read straight from sorted order.
    """
    K = expert_idx_TK.shape[1]
    expert_P = expert_idx_TK.reshape(-1)  # pair p = t * K + j
    order_P = torch.argsort(expert_P, stable=True)
    inverse_P = torch.empty_like(order_P)
    inverse_P[order_P] = torch.arange(order_P.numel(), device=order_P.device)
    counts_E = torch.bincount(expert_P, minlength=experts.num_experts)
    token_sorted_P = torch.div(order_P, K, rounding_mode="floor")
    x_PD = _GatherSorted.apply(x_TD, token_sorted_P, inverse_P, K)
    y_PD = experts.forward_sorted(x_PD, counts_E, impl)
    return _CombineSorted.apply(y_PD, weights_TK.to(y_PD.dtype), inverse_P, token_sorted_P, order_P)
