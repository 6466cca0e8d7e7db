"""Every router against its naive per-expert reference: outputs, aux losses and gradients."""

from __future__ import annotations

import moe_reference as ref
import pytest
import torch

from llava_smoe.config import parse
from llava_smoe.moe import (
    MoEConfig,
    MoELayer,
    collect_aux_losses,
    configure_moe_schedule,
)
from llava_smoe.moe.routers.base import RouteCall

D, F_SIZE, E, K = 12, 20, 4, 2

ALWAYS_COMPETE = {"warmup_fraction": 0.0, "competition_prob": 1.0, "max_competing_layers": 8}
CASES = {
    # name: (router, options, reference, needs [B, S, D])
    "smoe": ("smoe", {}, ref.smoe, False),
    "competesmoe-router": ("competesmoe", {}, ref.smoe, False),
    "competesmoe-competition": ("competesmoe", ALWAYS_COMPETE, ref.competition, False),
    "competesmoe-competition-l2": ("competesmoe", {**ALWAYS_COMPETE, "affinity": "l2"}, ref.competition, False),
    "remoe": ("remoe", {"lambda_init": 0.5}, ref.remoe, False),
    "mot": ("mot", {"group_size": 2, "temperature": 0.7}, ref.mot, True),
    "xmoe": ("xmoe", {}, ref.xmoe, False),
    "sigmoid": ("sigmoid", {}, ref.sigmoid, False),
}


def make_layer(router, options, ffn_kind="swiglu", dispatch="auto", seed=0, **cfg):
    torch.manual_seed(seed)
    config = MoEConfig(num_experts=E, top_k=K, router=router, router_options=options, dispatch=dispatch, **cfg)
    activation = "silu" if ffn_kind == "swiglu" else "gelu"
    layer = MoELayer(config, D, F_SIZE, ffn_kind=ffn_kind, activation=activation, bias=ffn_kind == "gelu")
    with torch.no_grad():  # spread the router so top-k choices are not near-ties
        for name, p in layer.router.named_parameters():
            p.mul_(20.0)
        if ffn_kind == "gelu":
            layer.experts.b_fc1_EF.normal_(std=0.1)
            layer.experts.b_fc2_ED.normal_(std=0.1)
        if router == "sigmoid":
            layer.router.bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    configure_moe_schedule(layer, total_steps=100)
    return layer


def grads(layer, x):
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None} | {"x": x.grad.clone()}


@pytest.mark.parametrize("ffn_kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", list(CASES))
def test_router_matches_reference(case, ffn_kind):
    router, options, reference, batched = CASES[case]
    layer = make_layer(router, options, ffn_kind)
    shape = (4, 3, D) if batched else (10, D)
    x = torch.randn(*shape, requires_grad=True)
    upstream = torch.randn(*shape)

    y = layer(x)
    aux = collect_aux_losses(layer)
    (torch.sum(y * upstream) + sum(aux.values())).backward()
    fast_grads = grads(layer, x)

    layer.zero_grad()
    x.grad = None
    y_ref, aux_ref = reference(layer, x)
    y_ref = y_ref.reshape(shape)
    aux_ref = {k: v for k, v in aux_ref.items() if float(v.detach()) != 0.0}
    (torch.sum(y_ref * upstream) + sum(aux_ref.values())).backward()
    ref_grads = grads(layer, x)

    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert set(aux) == set(aux_ref), (sorted(aux), sorted(aux_ref))
    for name in aux:
        torch.testing.assert_close(aux[name], aux_ref[name].to(aux[name].dtype), rtol=1e-4, atol=1e-7, msg=name)
    assert set(fast_grads) == set(ref_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("router", ["smoe", "remoe", "xmoe", "sigmoid", "competesmoe"])
@pytest.mark.parametrize("ffn_kind", ["swiglu", "gelu"])
def test_grouped_and_loop_dispatch_identical(router, ffn_kind):
    x = torch.randn(64, D)
    results = {}
    for dispatch in ("grouped", "loop"):
        layer = make_layer(router, {}, ffn_kind, dispatch=dispatch)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()  # .sum() gives a stride-0 gradient: the grouped path must cope
        results[dispatch] = (y.detach(), grads(layer, xi))
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], rtol=1e-5, atol=1e-6)
    for name, g in results["grouped"][1].items():
        torch.testing.assert_close(g, results["loop"][1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_empty_experts_do_not_crash(dispatch):
    layer = make_layer("smoe", {}, dispatch=dispatch)
    with torch.no_grad():  # every token prefers experts 0 and 1: experts 2 and 3 get nothing
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0, 0] = 50.0
        layer.router.weight_ED[1, 0] = 40.0
    x = torch.randn(16, D)
    x[:, 0] = x[:, 0].abs() + 1.0
    x.requires_grad_()
    y = layer(x)
    y.pow(2).sum().backward()
    assert torch.isfinite(y).all()
    assert layer.experts.w_gate_up_EDF2.grad[2:].abs().sum() == 0
    stats = layer.routing_stats()
    assert stats["dead_experts"] == 2
    # A ReMoE layer whose router outputs are all zero routes nothing at all.
    remoe = make_layer("remoe", {})
    with torch.no_grad():
        remoe.router.weight_ED.fill_(-1.0)
    xr = torch.randn(8, D).abs().requires_grad_()
    out = remoe(xr)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()


@pytest.mark.parametrize("router", ["smoe", "competesmoe", "remoe", "mot", "xmoe", "sigmoid"])
def test_bf16_runs(router):
    options = {"group_size": 2} if router == "mot" else {}
    layer = make_layer(router, options).to(torch.bfloat16)
    x = torch.randn(4, 6, D, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    loss = y.float().pow(2).mean() + sum(collect_aux_losses(layer).values(), torch.zeros(()))
    loss.backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    # Per-step state keeps full precision whatever the model's dtype.
    if router == "remoe":
        assert layer.router.l1_lambda.dtype == torch.float32
    if router == "sigmoid":
        assert layer.router.bias_E.dtype == torch.float32


def test_shared_experts_add_dense_path():
    layer = make_layer("smoe", {}, num_shared_experts=1)
    x = torch.randn(6, D)
    with torch.no_grad():
        routed_only = layer.router(x, layer.experts, RouteCall("loop", (6,)))[0]
        shared = layer.shared_experts.forward_expert(x, 0)
        torch.testing.assert_close(layer(x), routed_only + shared, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=4, top_k=5), "top_k=5 exceeds num_experts=4"),
        (dict(router="nope"), r"router: 'nope' is not one of \['competesmoe', "),
        (dict(router="smoe", router_options={"temprature": 1.0}), "unknown key 'router_options.temprature'"),
        (dict(router="mot", router_options={"group_size": 0}), "group_size: must be a positive integer"),
        (dict(router="competesmoe", router_options={"affinity": "max"}), "affinity: 'max' is not one of"),
        (dict(router="remoe", router_options={"alpha": 0.9}), "alpha: must be > 1"),
        (dict(dispatch="fast"), "dispatch: 'fast' is not one of"),
        (dict(num_experts=0), "num_experts: must be a positive integer"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_mot_batch_not_divisible_by_group_raises_clearly():
    layer = make_layer("mot", {"group_size": 4})
    with pytest.raises(ValueError, match="groups of 4 sequences, but the batch has 6"):
        layer(torch.randn(6, 3, D))
    with pytest.raises(ValueError, match=r"needs \[batch, seq, hidden\]"):
        layer(torch.randn(8, D))


def test_config_round_trip():
    cfg = MoEConfig(num_experts=8, top_k=2, router="remoe", router_options={"alpha": 1.5}, num_shared_experts=1)
    assert parse(MoEConfig, cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key 'experts'"):
        parse(MoEConfig, {**cfg.to_dict(), "experts": 3})


@pytest.mark.parametrize("router, expected", [("smoe", 2.0), ("xmoe", 2.0), ("sigmoid", 2.0)])
def test_expert_evaluations_per_token_are_recorded(router, expected):
    from llava_smoe.moe import MoELayer, routing_stats

    m = MoELayer(MoEConfig(num_experts=4, top_k=2, router=router), 16, 32)
    m(torch.randn(2, 8, 16))
    stats = routing_stats(m)
    assert stats[""]["expert_evals_per_token"] == pytest.approx(expected)


def test_expert_evaluations_of_remoe_mot_and_competition():
    from llava_smoe.moe import MoELayer, configure_moe_schedule, routing_stats

    x = torch.randn(4, 8, 16)
    remoe = MoELayer(MoEConfig(num_experts=4, top_k=1, router="remoe"), 16, 32)
    remoe(x)
    active = float((torch.relu(x.reshape(-1, 16) @ remoe.router.weight_ED.t()) > 0).sum()) / 32
    assert routing_stats(remoe)[""]["expert_evals_per_token"] == pytest.approx(active)
    mot = MoELayer(MoEConfig(num_experts=4, top_k=1, router="mot", router_options={"group_size": 4}), 16, 32)
    mot(x)
    assert routing_stats(mot)[""]["expert_evals_per_token"] == pytest.approx(4 / 4)  # E experts per group of 4
    compete = MoELayer(MoEConfig(num_experts=4, top_k=2, router="competesmoe", router_options={
        "warmup_fraction": 0.0, "competition_prob": 1.0}), 16, 32).train()
    configure_moe_schedule(compete, 10)
    compete(x)
    assert routing_stats(compete)[""]["expert_evals_per_token"] == pytest.approx(4.0)  # every expert


def test_threads_validating_at_once_see_every_router():
    """The first lookup imports the router modules; a second thread asking meanwhile (a study's
    workers resolving their cells' configs) must wait for them, not read a half-filled registry."""
    script = """
import importlib, threading, time
import llava_smoe.moe.routers as routers
real = importlib.import_module
def slow(name, *args):
    time.sleep(0.05)
    return real(name, *args)
routers.importlib = type("slow_importlib", (), {"import_module": staticmethod(slow)})
seen = []
threads = [threading.Thread(target=lambda: seen.append(routers.available_routers())) for _ in range(2)]
for t in threads:
    t.start()
    time.sleep(0.01)
for t in threads:
    t.join()
print(seen)
assert seen == [sorted(routers.BUILTIN_ROUTERS)] * 2, seen
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
