"""Naive per-token, per-expert reference implementations of every router (the test oracle).

Written for clarity, not speed: explicit Python loops over tokens and experts, using only
`GroupedExperts.forward_expert` (one expert on a few rows) and the router's raw parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ffn(experts, x_D: torch.Tensor, e: int) -> torch.Tensor:
    return experts.forward_expert(x_D.unsqueeze(0), e)[0]


def switch_balance(probs_TE, idx_TK):
    T, E = probs_TE.shape
    f = torch.zeros(E, dtype=probs_TE.dtype)
    for t in range(idx_TK.shape[0]):
        for j in range(idx_TK.shape[1]):
            f[idx_TK[t, j]] += 1.0
    f = f / idx_TK.numel()
    return E * sum(f[e] * probs_TE[:, e].mean() for e in range(E))


def smoe(layer, x_TD):
    r, ex, k = layer.router, layer.experts, layer.config.top_k
    logits = x_TD.float() @ r.weight_ED.float().t()
    probs = F.softmax(logits, -1)
    out = []
    idx_all = []
    for t in range(x_TD.shape[0]):
        top_p, idx = probs[t].topk(k)
        w = top_p / top_p.sum()
        out.append(sum(w[j] * ffn(ex, x_TD[t], int(idx[j])) for j in range(k)))
        idx_all.append(idx)
    idx_TK = torch.stack(idx_all)
    aux = {
        "balance": r.opts.balance_coef * switch_balance(probs, idx_TK),
        "z_loss": r.opts.z_loss_coef * torch.stack([torch.logsumexp(logits[t], 0) ** 2 for t in range(len(logits))]).mean(),
    }
    return torch.stack(out), aux


def competition(layer, x_TD):
    r, ex, k, E = layer.router, layer.experts, layer.config.top_k, layer.config.num_experts
    o = r.opts
    out, aff_rows, idx_rows, sel_rows = [], [], [], []
    for t in range(x_TD.shape[0]):
        ys = [ffn(ex, x_TD[t], e) for e in range(E)]
        if o.affinity == "softplus":
            a = torch.stack([F.softplus(y).mean() for y in ys])
        else:
            a = torch.stack([y.norm() for y in ys])
        top_a, idx = a.topk(k)
        w = top_a / top_a.sum()
        out.append(sum(w[j] * ys[int(idx[j])] for j in range(k)))
        aff_rows.append(a)
        idx_rows.append(idx)
        sel_rows.append([ys[int(i)] for i in idx])
    a_TE, idx_TK = torch.stack(aff_rows), torch.stack(idx_rows)
    q = F.softmax(a_TE, -1)
    p = F.softmax(x_TD.float() @ r.weight_ED.float().t(), -1)
    pair_sims = []
    for sel in sel_rows:
        for i in range(k):
            for j in range(i + 1, k):
                pair_sims.append(F.cosine_similarity(sel[i], sel[j], dim=0))
    aux = {
        "distill": o.distill_coef * ((p - q.detach()) ** 2).mean(),
        "diversity": o.diversity_coef * torch.stack(pair_sims).mean(),
        "balance": o.competition_balance_coef * switch_balance(q, idx_TK),
    }
    return torch.stack(out), aux


def remoe(layer, x_TD):
    r, ex, k, E = layer.router, layer.experts, layer.config.top_k, layer.config.num_experts
    T = x_TD.shape[0]
    R = torch.relu(x_TD.float() @ r.weight_ED.float().t())
    out = []
    for t in range(T):
        acc = torch.zeros(x_TD.shape[1])
        for e in range(E):
            if R[t, e] > 0:
                acc = acc + R[t, e] * ffn(ex, x_TD[t], e)
        out.append(acc)
    c = (R > 0).sum(0).float()
    f = E * c / (k * T)
    l1 = sum(f[e] * R[t, e] for t in range(T) for e in range(E)) / T
    return torch.stack(out), {"l1": r.l1_lambda * l1}


def mot(layer, x_BSD):
    r, ex, E = layer.router, layer.experts, layer.config.num_experts
    G = r.opts.group_size
    tau = math.exp(float(r.log_temperature))
    B, S, D = x_BSD.shape
    out = torch.zeros(B, S, D)
    for g0 in range(0, B, G):
        for s in range(S):
            xs = x_BSD[g0 : g0 + G, s]  # [G, D]
            logits = (xs.float() @ r.weight_ED.float().t()) / tau  # [G, E]
            m = F.softmax(logits, dim=0)
            for e in range(E):
                z = (m[:, e : e + 1] * xs).sum(0)
                y = ffn(ex, z, e)
                for g in range(G):
                    out[g0 + g, s] = out[g0 + g, s] + m[g, e] * y
    return out, {}


def xmoe(layer, x_TD):
    r, ex, k = layer.router, layer.experts, layer.config.top_k
    h = F.normalize(x_TD.float() @ r.proj_RD.t(), dim=-1)
    emb = F.normalize(r.expert_emb_ER, dim=-1)
    logits = h @ emb.t() / r.opts.temperature
    probs = F.softmax(logits, -1)
    out, idx_rows = [], []
    for t in range(x_TD.shape[0]):
        top_p, idx = probs[t].topk(k)
        w = top_p / top_p.sum()
        out.append(sum(w[j] * ffn(ex, x_TD[t], int(idx[j])) for j in range(k)))
        idx_rows.append(idx)
    return torch.stack(out), {"balance": r.opts.balance_coef * switch_balance(probs, torch.stack(idx_rows))}


def sigmoid(layer, x_TD):
    r, ex, k = layer.router, layer.experts, layer.config.top_k
    s = torch.sigmoid(x_TD.float() @ r.weight_ED.float().t())
    out = []
    for t in range(x_TD.shape[0]):
        idx = (s[t] + r.bias_E).topk(k).indices
        w = s[t, idx] / s[t, idx].sum() * r.opts.scale
        out.append(sum(w[j] * ffn(ex, x_TD[t], int(idx[j])) for j in range(k)))
    return torch.stack(out), {}
