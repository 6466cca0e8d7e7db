"""CompeteSMoE: gradient isolation, E expert evaluations, and the counter-based schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_smoe.moe import (
    GroupedExperts,
    MoEConfig,
    MoELayer,
    collect_aux_losses,
    configure_moe_schedule,
    moe_optimizer_step,
    routing_stats,
)
from llava_smoe.moe.routers.competesmoe import competing_layers

D, F_SIZE, E, K = 16, 32, 4, 2
ALWAYS = {"warmup_fraction": 0.0, "competition_prob": 1.0, "max_competing_layers": 8}


def layer(options=None, seed=0):
    torch.manual_seed(seed)
    m = MoELayer(MoEConfig(num_experts=E, top_k=K, router="competesmoe", router_options=options or {}), D, F_SIZE)
    configure_moe_schedule(m, total_steps=100)
    return m


class Stack(nn.Module):
    def __init__(self, num_layers, options, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = MoEConfig(num_experts=E, top_k=K, router="competesmoe", router_options=options)
        self.layers = nn.ModuleList(MoELayer(cfg, D, F_SIZE, layer_idx=i) for i in range(num_layers))

    def decisions(self):
        return [bool(m.router.competes_now()) for m in self.layers]


def test_router_gradient_comes_only_from_distillation_on_competition_steps():
    m = layer(ALWAYS)
    x = torch.randn(24, D)
    y = m(x)
    aux = collect_aux_losses(m)
    assert set(aux) == {"distill", "diversity", "balance"}
    others = torch.sum(y * torch.randn_like(y)) + aux["diversity"] + aux["balance"]
    others.backward(retain_graph=True)
    assert m.router.weight_ED.grad is None or m.router.weight_ED.grad.abs().max() == 0
    assert m.experts.w_gate_up_EDF2.grad.abs().max() > 0  # experts learn through outputs and weights
    m.zero_grad()
    aux["distill"].backward()
    assert m.router.weight_ED.grad.abs().max() > 0


def test_competition_evaluates_each_expert_exactly_once(monkeypatch):
    m = layer(ALWAYS)
    rows = {"batched": 0, "sorted": 0}
    orig_batched, orig_sorted = GroupedExperts.forward_batched, GroupedExperts.forward_sorted

    def batched(self, x_END):
        rows["batched"] += x_END.shape[0] * x_END.shape[1]
        return orig_batched(self, x_END)

    def sorted_(self, x_PD, counts_E, impl="grouped"):
        rows["sorted"] += x_PD.shape[0]
        return orig_sorted(self, x_PD, counts_E, impl)

    monkeypatch.setattr(GroupedExperts, "forward_batched", batched)
    monkeypatch.setattr(GroupedExperts, "forward_sorted", sorted_)
    T = 10
    m(torch.randn(T, D))
    assert rows == {"batched": E * T, "sorted": 0}  # E evaluations per token, not E + k
    rows.update(batched=0, sorted=0)
    with torch.no_grad():  # inference: router only, k evaluations per token
        m(torch.randn(T, D))
    assert rows == {"batched": 0, "sorted": K * T}


def test_router_policy_under_no_grad_and_eval_even_on_competition_steps():
    m = layer(ALWAYS)
    x = torch.randn(8, D)
    with torch.no_grad():
        y_nograd = m(x)
    m.eval()
    y_eval = m(x)
    m.train()
    smoe = MoELayer(MoEConfig(num_experts=E, top_k=K, router="smoe"), D, F_SIZE)
    smoe.load_state_dict(m.state_dict(), strict=False)
    torch.testing.assert_close(y_nograd, smoe(x).detach())
    torch.testing.assert_close(y_eval, y_nograd)
    assert collect_aux_losses(m) == {}


def test_schedule_rate_warmup_and_cap():
    total, L = 4000, 12
    warm = 0.05
    per_step = [competing_layers(7, s, L, total, warm, 0.05, 3) for s in range(total)]
    assert all(not layers for layers in per_step[: int(warm * total)])
    after = per_step[int(warm * total):]
    rate = sum(len(x) for x in after) / (len(after) * L)
    assert 0.04 < rate < 0.06  # 12 layers at 5% rarely exceed the cap
    # The cap binds when many layers would compete.
    capped = [competing_layers(7, s, L, total, 0.0, 0.9, 3) for s in range(200)]
    assert max(len(x) for x in capped) == 3 and min(len(x) for x in capped) == 3
    # Deterministic, and a longer run keeps every post-warm-up decision.
    assert per_step[1000] == competing_layers(7, 1000, L, total, warm, 0.05, 3)
    assert per_step[1000] == competing_layers(7, 1000, L, 2 * total, warm, 0.05, 3)
    assert [competing_layers(8, s, L, total, warm, 0.05, 3) for s in range(200, 400)] != per_step[200:400]


def run_steps(model, steps, start=0):
    seen = []
    for step in range(start, start + steps):
        seen.append(model.decisions())
        moe_optimizer_step(model, step + 1)
    return seen


def test_schedule_agrees_across_ranks_and_micro_batches():
    opts = {"warmup_fraction": 0.1, "competition_prob": 0.3, "max_competing_layers": 2}
    rank0, rank1 = Stack(6, opts, seed=0), Stack(6, opts, seed=1)  # different weights, same config
    for model in (rank0, rank1):
        configure_moe_schedule(model, total_steps=60)
    d0, d1 = run_steps(rank0, 60), run_steps(rank1, 60)
    assert d0 == d1
    assert not any(any(d) for d in d0[:6])  # warm-up: 10% of 60 steps
    assert max(sum(d) for d in d0) <= 2 and any(any(d) for d in d0)
    # Several micro-batches within one optimizer step see the same decision.
    assert rank0.decisions() == rank0.decisions()


def test_schedule_survives_save_and_restore():
    opts = {"warmup_fraction": 0.0, "competition_prob": 0.4, "max_competing_layers": 3}
    full = Stack(5, opts)
    configure_moe_schedule(full, total_steps=40)
    expected = run_steps(full, 40)

    first = Stack(5, opts)
    configure_moe_schedule(first, total_steps=40)
    got = run_steps(first, 17)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert int(state["layers.0.router.step"]) == 17

    resumed = Stack(5, opts, seed=3)
    configure_moe_schedule(resumed, total_steps=40)
    resumed.load_state_dict(state)
    got += run_steps(resumed, 23, start=17)
    assert got == expected


def test_competition_statistics():
    m = layer(ALWAYS)
    m(torch.randn(32, D))
    stats = routing_stats(m)[""]
    assert stats["competition_rate"] == 1.0
    assert 0.0 <= stats["router_agreement"] <= 1.0
    assert sum(stats["tokens_per_expert"]) == 32 * K


def test_training_without_configured_schedule_raises():
    m = MoELayer(MoEConfig(num_experts=E, top_k=K, router="competesmoe"), D, F_SIZE)
    with pytest.raises(RuntimeError, match="configure_moe_schedule"):
        m(torch.randn(4, D))


def test_declared_aux_names_cover_both_policies():
    from llava_smoe.moe import aux_loss_names

    model = Stack(2, {"warmup_fraction": 0.0, "competition_prob": 0.5, "max_competing_layers": 1})
    configure_moe_schedule(model, total_steps=50)
    declared = set(aux_loss_names(model))
    assert declared == {"balance", "z_loss", "distill", "diversity"}
    seen = set()
    for step in range(10):
        for m in model.layers:
            m(torch.randn(6, D))
        seen |= set(collect_aux_losses(model))
        moe_optimizer_step(model, step + 1)
    assert seen == declared  # both router steps and competition steps occurred


def test_official_conventions_give_the_official_values_on_a_case_computed_by_hand():
    from llava_smoe.moe.routers.base import balance_loss
    from llava_smoe.moe.routers.competesmoe import diversity

    probs_TE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    idx_TK = torch.tensor([[0, 1], [0, 2], [1, 0]])
    # P = column means (0.8, 1.1, 1.1) / 3. All k slots: f = (3, 2, 1) / 6 -> 3 * sum f P = 0.95.
    # First choices only (0, 0, 1): f = (2, 1, 0) / 3 -> 0.9.
    assert balance_loss(probs_TE, idx_TK).item() == pytest.approx(0.95)
    assert balance_loss(probs_TE, idx_TK, "top1").item() == pytest.approx(0.9)

    # k = 2, cosine 0.6: the pairwise mean is 0.6; over all 2 x 2 entries with a zero diagonal, 0.3.
    y_TKD = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    assert diversity(y_TKD).item() == pytest.approx(0.6)
    assert diversity(y_TKD, "official").item() == pytest.approx(0.3)
    # k = 3 with cosines 0.6 (1-2), 0 (1-3), 0 (2-3): pairwise 0.2, official 2 * 0.6 / 9.
    y_TKD = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]])
    assert diversity(y_TKD).item() == pytest.approx(0.2)
    assert diversity(y_TKD, "official").item() == pytest.approx(1.2 / 9)


def test_official_options_reach_the_competition_losses():
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    aux = {}
    for name, options in (("ours", {}), ("official", {"diversity_normalization": "official", "balance_count": "top1"})):
        m = layer({**ALWAYS, **options})
        m(x)
        aux[name] = collect_aux_losses(m)
    # At k = 2 the official normalisation is exactly half the pairwise mean (same experts, same inputs).
    assert aux["official"]["diversity"].item() == pytest.approx(aux["ours"]["diversity"].item() / 2, rel=1e-5)
    assert aux["official"]["balance"].item() != pytest.approx(aux["ours"]["balance"].item())
    assert aux["official"]["distill"].item() == pytest.approx(aux["ours"]["distill"].item())
