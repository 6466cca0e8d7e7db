"""Expert parallelism: each rank of a process group holds E / ep of a layer's experts, and
tokens travel to their experts' ranks and back with `torch.distributed.all_to_all_single`.

`shard_experts(model, group)` swaps every MoE layer's `experts` for `ExpertParallelExperts`: the
layer's own slice of the expert weights (rank r of the group holds experts r E/ep ...
(r + 1) E/ep - 1, under the same parameter names) behind the methods routers already call, so
routers, the MoE layer and the model stay as they are: parallelism swaps the dispatcher.

- Token choice (`forward_sorted`, reached through `dispatch_topk` / `dispatch_pairs`, pairs
  sorted by expert): the ranks exchange how many rows each sends to each expert (one small
  all-to-all and one host sync for the split sizes), then the rows (all-to-all), each rank
  runs its experts on what it received (grouped GEMM, rows reordered expert-major), and the
  outputs return by the reverse all-to-all.
- Competition (`forward_all`, CompeteSMoE: every expert on every token): every rank sends all
  its tokens to every rank of the group (an all-gather made of one all-to-all), each rank runs
  its E/ep experts on all the group's tokens, and the outputs [T, E/ep, D] of each expert return
  to each token's rank, which assembles [T, E, D] and competes as on one process. Per rank and
  layer this moves (ep - 1) T D input elements and (E - E/ep) T D output elements, against
  about 2 k T D (ep - 1) / ep for a router step: some E / (2k) times more.
- Mixture of Tokens (`forward_batched`): expert e's rows go to e's rank and back.

Every rank joins every collective of every layer whatever its tokens (an expert, or a whole rank,
with nothing to send sends zero rows), and under autograd each exchange's input requires a
gradient, so every rank's backward runs the reverse exchanges too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .experts import GroupedExperts, _PermuteRows


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        y_MD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(y_MD, x_ND.contiguous(), out_splits, in_splits, group=group)
        return y_MD

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits = ctx.splits
        grad_ND = grad_MD.new_empty((sum(in_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_MD.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_ND, None, None, None


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows `x_ND` split by `in_splits` go to the ranks of `group`; `out_splits` rows arrive from each."""
    if torch.is_grad_enabled() and not x_ND.requires_grad:
        # Every rank's backward must run the reverse exchange, even where nothing before needs it.
        x_ND = x_ND.detach().requires_grad_()
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


def exchange_counts(counts_R: torch.Tensor, group) -> torch.Tensor:
    """Entry r of `counts_R` goes to rank r; returns what each rank sent here (no gradient)."""
    received_R = torch.empty_like(counts_R)
    dist.all_to_all_single(received_R, counts_R.contiguous(), group=group)
    return received_R


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of a layer's experts, dispatching tokens over `group`.

    `num_experts` stays the layer's E (what routers count and index); the weights hold the
    `num_local_experts` experts starting at `first_expert`.
    """

    def __init__(self, experts: GroupedExperts, group) -> None:
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        E = experts.num_experts
        if E % ep:
            raise ValueError(f"{E} experts cannot be split evenly over {ep} expert-parallel ranks")
        local = E // ep
        super().__init__(local, experts.hidden_size, experts.ffn_size, experts.ffn_kind, experts.activation,
                         experts.bias)
        ref = experts.w_in
        self.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for p, full in zip(self.parameters(), experts.parameters()):
                p.copy_(full[rank * local:(rank + 1) * local])
                p.requires_grad_(full.requires_grad)
        self.group, self.ep_size, self.ep_rank = group, ep, rank
        self.num_local_experts, self.first_expert = local, rank * local
        self.num_experts = E

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} "
                f"of {self.num_experts} (expert-parallel rank {self.ep_rank} of {self.ep_size})")

    # -- token choice: rows sorted by (global) expert ---------------------------------------------
    def forward_sorted(self, x_PD: torch.Tensor, counts_E: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        ep, local = self.ep_size, self.num_local_experts
        send_RE = counts_E.view(ep, local)  # rows for each rank's experts, in rank order
        recv_RE = exchange_counts(send_RE, self.group)  # rows each rank sends to each of my experts
        send_R, recv_R = send_RE.sum(1), recv_RE.sum(1)
        splits = torch.cat([send_R, recv_R]).tolist()  # the exchange's one host sync
        send, recv = splits[:ep], splits[ep:]
        x_QD = all_to_all(x_PD, recv, send, self.group)  # rows grouped (source rank, my expert)
        # Expert-major order for the grouped GEMM: a stable sort of each row's (expert, source rank).
        segment_Q = torch.repeat_interleave(torch.arange(ep * local, device=x_QD.device), recv_RE.reshape(-1))
        order_Q = torch.argsort((segment_Q % local) * ep + segment_Q // local, stable=True)
        inverse_Q = torch.empty_like(order_Q)
        inverse_Q[order_Q] = torch.arange(order_Q.numel(), device=order_Q.device)
        y_QD = super().forward_sorted(_PermuteRows.apply(x_QD, order_Q, inverse_Q), recv_RE.sum(0), impl)
        return all_to_all(_PermuteRows.apply(y_QD, inverse_Q, order_Q), send, recv, self.group)

    # -- competition: every expert on every token ---------------------------------------------------
    def forward_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep_size, self.num_local_experts
        T, D = x_TD.shape
        tokens_R = exchange_counts(torch.full((ep,), T, dtype=torch.long, device=x_TD.device), self.group).tolist()
        # Every token to every rank; each rank's experts run on all the group's tokens.
        x_ND = all_to_all(x_TD.repeat(ep, 1), tokens_R, [T] * ep, self.group)
        y_LND = super().forward_batched(x_ND.unsqueeze(0).expand(local, -1, -1))
        # Back to each token's rank: its rows of all my experts; they arrive owner by owner.
        y_NLD = y_LND.transpose(0, 1).reshape(-1, local * D)
        y_RTLD = all_to_all(y_NLD, [T] * ep, tokens_R, self.group).view(ep, T, local, D)
        return y_RTLD.permute(1, 0, 2, 3).reshape(T, ep * local, D)

    # -- Mixture of Tokens: expert e on its own rows -----------------------------------------------
    def forward_batched(self, x_END: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep_size, self.num_local_experts
        E, N, D = x_END.shape
        rows_R = exchange_counts(torch.full((ep,), N, dtype=torch.long, device=x_END.device), self.group).tolist()
        recv = [local * n for n in rows_R]
        x_QD = all_to_all(x_END.reshape(E * N, D), recv, [local * N] * ep, self.group)
        # Source by source, [local, N_source, D]: my experts' rows side by side.
        parts_LnD = [p.view(local, n, D) for p, n in zip(torch.split(x_QD, recv), rows_R)]
        y_LMD = super().forward_batched(torch.cat(parts_LnD, dim=1))
        back_QD = torch.cat([p.reshape(-1, D) for p in torch.split(y_LMD, rows_R, dim=1)])
        return all_to_all(back_QD, [local * N] * ep, recv, self.group).view(E, N, D)

    def forward_expert(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        if not self.first_expert <= e < self.first_expert + self.num_local_experts:
            raise ValueError(f"expert {e} lives on another expert-parallel rank (this one holds "
                             f"{self.first_expert}..{self.first_expert + self.num_local_experts - 1})")
        return super().forward_expert(x_ND, e - self.first_expert)


def shard_experts(model: nn.Module, group) -> list[str]:
    """Give every MoE layer of `model` this rank's slice of its experts (see the module doc);
    returns the qualified names of the sharded parameters."""
    from .api import moe_layers

    names = []
    for name, layer in moe_layers(model):
        if isinstance(layer.experts, ExpertParallelExperts):
            raise ValueError(f"MoE layer {name} is already sharded over an expert-parallel group")
        layer.experts = ExpertParallelExperts(layer.experts, group)
        names += [f"{name}.experts.{n}" for n, _ in layer.experts.named_parameters()]
    return names


def gathered_experts(experts: ExpertParallelExperts) -> GroupedExperts:
    """All E experts of a sharded layer as one `GroupedExperts` (collective: all_gather of the weights)."""
    full = GroupedExperts(experts.num_experts, experts.hidden_size, experts.ffn_size, experts.ffn_kind,
                          experts.activation, experts.bias).to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    with torch.no_grad():
        for p_full, p in zip(full.parameters(), experts.parameters()):
            parts = [torch.empty_like(p) for _ in range(experts.ep_size)]
            dist.all_gather(parts, p.detach().contiguous(), group=experts.group)
            p_full.copy_(torch.cat(parts))
            p_full.requires_grad_(p.requires_grad)
    return full
