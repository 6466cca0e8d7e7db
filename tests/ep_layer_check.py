"""Run under torchrun (gloo): an expert-parallel MoE layer against the single-process layer.

Every rank builds the same layer and the same inputs for every rank (different token counts per
rank). The reference runs the unsharded layer on each rank's tokens alone; the sharded layer
runs on this rank's tokens over the expert-parallel group. They must agree on the outputs, the
aux losses, the input gradients, the router gradients (this rank's tokens) and the expert
gradients (the sum over the group's tokens, as the reverse all-to-all accumulates them).
Each rank writes one JSON line per check to OUT/rank-R.jsonl; any mismatch raises (non-zero exit).

    torchrun --nproc-per-node 4 tests/ep_layer_check.py OUT 4,2     # EP sizes to check
"""

from __future__ import annotations

import copy
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from llava_smoe.moe import MoEConfig, MoELayer, configure_moe_schedule
from llava_smoe.moe.parallel import ExpertParallelExperts, shard_experts

D, F = 16, 24
CASES = {
    "smoe": dict(router="smoe", num_experts=4, top_k=2),
    "competesmoe-router": dict(router="competesmoe", num_experts=4, top_k=2,
                               router_options={"warmup_fraction": 1.0}),
    "competesmoe-competition": dict(router="competesmoe", num_experts=4, top_k=2,
                                    router_options={"warmup_fraction": 0.0, "competition_prob": 1.0}),
    "remoe": dict(router="remoe", num_experts=4, top_k=2),
    "smoe-8-experts": dict(router="smoe", num_experts=8, top_k=2),
    "mot": dict(router="mot", num_experts=4, top_k=2),
    # Aux losses are means over the tokens: undefined on a rank without any.
    "smoe-no-aux": dict(router="smoe", num_experts=4, top_k=2, router_options={"balance_coef": 0.0, "z_loss_coef": 0.0}),
}


def inputs(rank: int, world: int, case: str, skewed: bool) -> torch.Tensor:
    """Rank r's tokens: [2, 3 + r, D] (MoT mixes across the batch: batch 4, group 4)."""
    g = torch.Generator().manual_seed(100 + rank)
    shape = (4, 2 + rank, D) if case == "mot" else (2, 3 + rank, D)
    x = torch.randn(shape, generator=g)
    if skewed and rank == world - 1:
        x = x + 6.0 * torch.ones(D) / D**0.5  # far along the direction the router below favours
    return x


def layer_for(case: str, skewed: bool) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**CASES[case]), D, F)
    if skewed:
        # Experts 0 and 1 score low along u, the others high: the last rank's tokens never choose
        # experts 0 and 1, so it sends their rank nothing, and some experts get no token at all.
        u = torch.ones(D) / D**0.5
        with torch.no_grad():
            sign = torch.tensor([-1.0] * 2 + [1.0] * (layer.config.num_experts - 2))
            layer.router.weight_ED.copy_(0.01 * torch.randn_like(layer.router.weight_ED) + 3.0 * sign[:, None] * u)
    configure_moe_schedule(layer, 10)
    layer.train()
    return layer


def run(layer: MoELayer, x: torch.Tensor, w: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    aux = layer.pop_aux_losses()
    loss = (y * w).sum() + sum(aux.values())
    loss.backward()
    return y.detach(), x.grad, {k: float(v) for k, v in aux.items()}


def check(case: str, group, skewed: bool = False, empty_rank: bool = False) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_rank, ep = dist.get_rank(group), dist.get_world_size(group)
    members = [r for r in range(world) if r // ep == rank // ep]  # this rank's expert-parallel group
    ref = layer_for(case, skewed)
    xs = {r: inputs(r, world, case, skewed) for r in members}
    if empty_rank:
        xs[members[-1]] = xs[members[-1]][:, :0]  # a rank with no token at all
    ws = {r: torch.randn(xs[r].shape, generator=torch.Generator().manual_seed(7 + r)) for r in members}
    expected, expert_grads = {}, [torch.zeros_like(p) for p in ref.experts.parameters()]
    for r in members:
        layer = copy.deepcopy(ref)
        expected[r] = run(layer, xs[r], ws[r]) + ({n: p.grad.clone() for n, p in layer.router.named_parameters()
                                                   if p.grad is not None},)
        for acc, p in zip(expert_grads, layer.experts.parameters()):
            if p.grad is not None:
                acc += p.grad

    sharded = copy.deepcopy(ref)
    shard_experts(sharded, group)
    assert isinstance(sharded.experts, ExpertParallelExperts)
    y, gx, aux = run(sharded, xs[rank], ws[rank])
    y_ref, gx_ref, aux_ref, router_ref = expected[rank]
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    assert aux.keys() == aux_ref.keys(), (aux, aux_ref)
    for k in aux:
        assert abs(aux[k] - aux_ref[k]) <= 1e-5 * max(1.0, abs(aux_ref[k])), (k, aux[k], aux_ref[k])
    for n, p in sharded.router.named_parameters():
        if n in router_ref:
            torch.testing.assert_close(p.grad, router_ref[n], **tol)
    local = sharded.experts.num_local_experts
    for p, full in zip(sharded.experts.parameters(), expert_grads):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, full[ep_rank * local:(ep_rank + 1) * local], **tol)
    counts = sharded.routing_stats()["tokens_per_expert"]
    return {"case": case, "rank": rank, "ep": ep, "skewed": skewed, "empty_rank": empty_rank,
            "tokens": int(xs[rank].shape[:-1].numel()), "aux": sorted(aux), "tokens_per_expert": counts}


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails within a minute
    torch.set_num_threads(1)
    world = dist.get_world_size()
    out = open(f"{sys.argv[1]}/rank-{dist.get_rank()}.jsonl", "w")
    sizes = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [world]
    for ep in sizes:
        groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
        group = groups[dist.get_rank() // ep]
        for case in CASES:
            if case == "mot" or CASES[case]["num_experts"] % ep == 0:
                out.write(json.dumps(check(case, group)) + "\n")
        out.write(json.dumps(check("smoe", group, skewed=True)) + "\n")
        out.write(json.dumps(check("competesmoe-competition", group, skewed=True)) + "\n")
        out.write(json.dumps(check("smoe-no-aux", group, empty_rank=True)) + "\n")
    out.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
