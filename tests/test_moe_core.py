"""ReMoE's adaptive lambda, Mixture of Tokens, upcycling, statistics and per-step state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_smoe.moe import (
    MoEConfig,
    MoELayer,
    collect_aux_losses,
    configure_moe_schedule,
    convert_mot_to_token_choice,
    moe_optimizer_step,
    routing_stats,
    token_groups,
    upcycle_ffn,
)

D, F_SIZE = 16, 32


@pytest.mark.slow
def test_remoe_lambda_drives_sparsity_to_target():
    torch.manual_seed(0)
    E, K = 8, 2
    m = MoELayer(MoEConfig(num_experts=E, top_k=K, router="remoe"), D, F_SIZE)
    teacher = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, D))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    # Hidden states are anisotropic (non-zero mean); with zero-mean symmetric inputs a bias-free
    # ReLU gate is positive for exactly half the tokens whatever its weights.
    mu = torch.randn(D)
    sparsity = []
    for step in range(400):
        x = torch.randn(128, D) + mu
        with torch.no_grad():
            target = teacher(x)
        loss = (m(x) - target).pow(2).mean() + sum(collect_aux_losses(m).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe_optimizer_step(m, step + 1)
        sparsity.append(routing_stats(m)[""]["sparsity"])
    target_s = 1 - K / E
    assert sparsity[0] < 0.6  # starts near-dense (ReLU of a random router: about half active)
    late = sum(sparsity[-50:]) / 50
    assert abs(late - target_s) < 0.05, (late, target_s)
    assert float(m.router.l1_lambda) > 1e-8  # lambda grew from its initial value


def test_remoe_lambda_update_rule():
    m = MoELayer(MoEConfig(num_experts=4, top_k=1, router="remoe", router_options={"lambda_init": 1.0}), D, F_SIZE)
    with torch.no_grad():
        m.router.weight_ED.fill_(1.0)
    m(torch.ones(8, D))  # every gate positive: sparsity 0 < target 0.75 -> lambda grows
    moe_optimizer_step(m, 1)
    assert float(m.router.l1_lambda) == pytest.approx(1.2)
    with torch.no_grad():
        m.router.weight_ED.fill_(-1.0)
    m(torch.ones(8, D))  # every gate zero: sparsity 1 > 0.75 -> lambda shrinks
    moe_optimizer_step(m, 2)
    assert float(m.router.l1_lambda) == pytest.approx(1.0)
    moe_optimizer_step(m, 3)  # no forward since: nothing measured, nothing changes
    assert float(m.router.l1_lambda) == pytest.approx(1.0)


def test_mot_output_at_a_position_ignores_other_positions():
    torch.manual_seed(0)
    m = MoELayer(MoEConfig(num_experts=4, top_k=2, router="mot", router_options={"group_size": 4}), D, F_SIZE)
    x = torch.randn(8, 5, D)
    y = m(x)
    x2 = x.clone()
    x2[:, [0, 1, 3, 4]] = torch.randn(8, 4, D)  # change every position except 2
    torch.testing.assert_close(m(x2)[:, 2], y[:, 2])
    x3 = x.clone()
    x3[1, 2] += 1.0  # a token at the same position in the group does matter (that is the mixing)
    assert not torch.allclose(m(x3)[0, 2], y[0, 2])


def test_mot_conversion_to_token_choice_runs_with_any_batch():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router="mot", router_options={"group_size": 4, "temperature": 0.5})
    model = nn.Sequential(MoELayer(cfg, D, F_SIZE), MoELayer(cfg, D, F_SIZE))
    ctrl = model[0].router.weight_ED.detach().clone()
    assert convert_mot_to_token_choice(model, router="smoe", top_k=1) == 2
    assert model[0].config.router == "smoe" and model[0].config.top_k == 1
    torch.testing.assert_close(model[0].router.weight_ED, ctrl / 0.5)
    x = torch.randn(1, 3, D, requires_grad=True)  # batch 1: impossible for MoT groups of 4
    y = model(x)
    (y.sum() + sum(collect_aux_losses(model).values())).backward()
    assert y.shape == x.shape and model[0].router.weight_ED.grad is not None


def _hf_mlps():
    from transformers import CLIPVisionConfig, LlamaConfig, Phi3Config, Qwen3Config
    from transformers.models.clip.modeling_clip import CLIPMLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    common = dict(hidden_size=D, intermediate_size=F_SIZE, num_attention_heads=2, num_key_value_heads=2)
    return {
        "llama": LlamaMLP(LlamaConfig(**common)),
        "qwen3": Qwen3MLP(Qwen3Config(**common)),
        "phi3": Phi3MLP(Phi3Config(**common)),
        "clip": CLIPMLP(CLIPVisionConfig(**common, hidden_act="quick_gelu")),
    }


def _open_clip_mlp():
    from open_clip.transformer import ResidualAttentionBlock

    return ResidualAttentionBlock(d_model=D, n_head=2, mlp_ratio=2.0).mlp


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "clip", "open_clip"])
@pytest.mark.parametrize("router", ["smoe", "competesmoe", "xmoe", "sigmoid"])
def test_upcycled_layer_equals_dense_ffn(family, router):
    torch.manual_seed(0)
    dense = _open_clip_mlp() if family == "open_clip" else _hf_mlps()[family]
    for p in dense.parameters():  # non-trivial biases and weights
        nn.init.normal_(p, std=0.3)
    moe = upcycle_ffn(dense, MoEConfig(num_experts=4, top_k=2, router=router), layer_idx=3)
    configure_moe_schedule(moe, 10)
    assert moe.layer_idx == 3 and moe.experts.ffn_kind == ("gelu" if family in ("clip", "open_clip") else "swiglu")
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_upcycle_noise_breaks_ties_and_rejects_moe_input():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    dense = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F_SIZE, num_attention_heads=2, num_key_value_heads=2))
    moe = upcycle_ffn(dense, MoEConfig(num_experts=4, top_k=2, router="smoe", upcycle_noise=0.01))
    w = moe.experts.w_gate_up_EDF2
    assert not torch.equal(w[0], w[1])
    assert (w[0] - w[1]).abs().max() < 0.1 * w[0].abs().max()
    with pytest.raises(ValueError, match="already an MoE layer"):
        upcycle_ffn(moe, MoEConfig())
    with pytest.raises(ValueError, match="cannot upcycle Linear"):
        upcycle_ffn(nn.Linear(D, D), MoEConfig())


def test_routing_statistics_split_by_modality():
    torch.manual_seed(0)
    m = MoELayer(MoEConfig(num_experts=4, top_k=2, router="smoe"), D, F_SIZE)
    x = torch.randn(2, 6, D)
    groups = torch.zeros(2, 6, dtype=torch.long)
    groups[:, :4] = 1  # the first four tokens of each sequence are image tokens
    with token_groups(m, groups):
        m(x)
    s = routing_stats(m)[""]
    assert sum(s["tokens_per_expert_image"]) == 2 * 4 * 2
    assert sum(s["tokens_per_expert_text"]) == 2 * 2 * 2
    assert s["tokens_per_expert"] == [a + b for a, b in zip(s["tokens_per_expert_image"], s["tokens_per_expert_text"])]
    assert 0.0 <= s["router_entropy_normalized"] <= 1.0
    assert s["max_over_mean_load"] >= 1.0 and s["load_cv"] >= 0.0
    assert routing_stats(m)[""] == {}  # reset after reading


@pytest.mark.parametrize("router", ["competesmoe", "remoe", "sigmoid"])
def test_per_step_state_is_saved_and_restored(router):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router)
    m = MoELayer(cfg, D, F_SIZE)
    configure_moe_schedule(m, 100)
    for step in range(1, 6):
        m(torch.randn(16, D))
        collect_aux_losses(m)
        moe_optimizer_step(m, step)
    state = m.state_dict()
    fresh = MoELayer(cfg, D, F_SIZE)
    configure_moe_schedule(fresh, 100)
    fresh.load_state_dict(state)
    key = {"competesmoe": "router.step", "remoe": "router.l1_lambda", "sigmoid": "router.bias_E"}[router]
    assert key in state
    torch.testing.assert_close(fresh.state_dict()[key], state[key])
    if router == "competesmoe":
        assert int(state[key]) == 5
    if router == "remoe":
        assert float(state[key]) != pytest.approx(1e-8)  # five updates moved it
    if router == "sigmoid":
        assert state[key].abs().sum() > 0


def test_sigmoid_bias_moves_towards_balance():
    torch.manual_seed(0)
    m = MoELayer(MoEConfig(num_experts=4, top_k=1, router="sigmoid", router_options={"bias_update_rate": 0.1}), D, F_SIZE)
    with torch.no_grad():
        m.router.weight_ED.zero_()
        m.router.weight_ED[0, 0] = 5.0  # expert 0 wins for tokens with x_0 > 0
    x = torch.randn(64, D)
    x[:, 0] = x[:, 0].abs()
    m(x)
    moe_optimizer_step(m, 1)
    b = m.router.bias_E
    assert b[0] < 0 and (b[1:] > 0).all()


def test_bf16_grouped_path_matches_loop():
    torch.manual_seed(0)
    out = {}
    for dispatch in ("grouped", "loop"):
        torch.manual_seed(0)
        m = MoELayer(MoEConfig(num_experts=4, top_k=2, router="smoe", dispatch=dispatch), 32, 64).to(torch.bfloat16)
        assert m.impl == dispatch
        out[dispatch] = m(torch.randn(40, 32).to(torch.bfloat16))
    torch.testing.assert_close(out["grouped"], out["loop"], rtol=2e-2, atol=2e-2)


def test_statistics_survive_switching_between_inference_mode_and_training():
    m = MoELayer(MoEConfig(num_experts=4, top_k=2, router="smoe"), D, F_SIZE)
    with torch.inference_mode():
        m(torch.randn(5, D))
    m(torch.randn(3, D)).sum().backward()
    assert sum(routing_stats(m)[""]["tokens_per_expert"]) == (5 + 3) * 2


def test_the_experts_swiglu_equals_autograds_to_the_bit():
    from llava_smoe.moe.experts import silu_glu

    h = torch.randn(33, 48, requires_grad=True)
    g = torch.randn(33, 24)
    (silu_glu(h) * g).sum().backward()
    fused = h.grad.clone()
    h.grad = None
    gate, up = h.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up * g).sum().backward()
    assert torch.equal(fused, h.grad)
    assert torch.autograd.gradcheck(silu_glu, (torch.randn(5, 8, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("tokens", [7, 0])
def test_topk_dispatch_gradients_through_the_sorted_gather_and_combine(tokens):
    """dispatch_topk's hand-written backwards (gather-sum of each token's K copies, the weighted
    combine read from sorted order) against finite differences, and its output against the
    per-expert oracle."""
    from llava_smoe.moe.experts import GroupedExperts, dispatch_topk

    torch.manual_seed(0)
    experts = GroupedExperts(4, 6, 8).double()
    x = torch.randn(tokens, 6, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(tokens)]) if tokens else torch.zeros(0, 2, dtype=torch.long)
    w = torch.rand(tokens, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: dispatch_topk(experts, x, idx, w, "loop"), (x, w))
    y = dispatch_topk(experts, x, idx, w, "loop")
    ref = x.new_zeros(tokens, 6)
    for t in range(tokens):
        for j in range(2):
            ref[t] += w[t, j] * experts.forward_expert(x[t:t + 1], int(idx[t, j]))[0]
    torch.testing.assert_close(y, ref)
