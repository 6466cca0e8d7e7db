"""The arithmetic of `llava-smoe plan`: parameters, memory per GPU and FLOPs of a training run.

Inputs are the shapes of the model a stage trains (`model_shape`, read from the meta-device
model `resolve.py` builds, `requires_grad` marking what trains) and the run's settings. All sizes
are bytes; `b` below is the bytes of one activation element (2 under bf16, 4 under fp32).

Model states per GPU, for Psi parameters of which Psi_t train, on N GPUs (the ZeRO paper's
accounting; bytes per parameter for weights W, gradients G, optimizer state O):
    DeepSpeed bf16: W=2, G=2, O=12 (fp32 master copy + Adam m, v); fp32: W=4, G=4, O=8;
    the torch back end keeps fp32 weights under bf16 autocast: W=4, G=4, O=8.
    no ZeRO: W Psi + (G + O) Psi_t;  ZeRO-2: W Psi + (G + O) Psi_t / N;  ZeRO-3: (W Psi + (G + O) Psi_t) / N
    plus, under ZeRO-3, the parameters gathered for compute (the largest block twice, for the
    prefetch: an MoE layer is a ZeRO-3 leaf, gathered whole, every expert; and those kept for
    their reuse in the backward, up to `stage3_max_reuse_distance` / 2) and the
    communication buckets the DeepSpeed JSON names. Expert parallelism (torch back end)
    divides the experts' share by the expert-parallel size.

Activations per sample (a sequence of `seq_len` tokens, one image): what autograd saves for the
backward, tensor by tensor, as transformers' decoder layers and our MoE layers save it (a frozen
linear saves no input; a frozen tower saves nothing), plus the loss: logits (b V per token, held
by the output) and, at the loss's backward, fp32 log-probabilities and two fp32 gradients
(12 V). With gradient checkpointing each decoder layer keeps only its input (b D per token) and
the backward recomputes one layer at a time. A competition step's MoE layer keeps the
every-expert tensors: the hidden [T, E, 2F] plus [T, E, F] twice, and the outputs [T, E, D].

FLOPs per token: 2 per multiply-add of each matmul a token passes (routed experts: k of E;
competition: all E), attention scores as 4 S q per token (full S, as MFU is usually counted),
times 3 for a trained matmul (forward, input and weight gradients), 2 for a frozen one on the
gradient path, 1 off it (a frozen tower). The schedule weighs competition: after the warm-up
fraction w each CompeteSMoE layer competes with probability p, at most m per step, so a step
has on average (1 - w) E[min(Binomial(n, p), m)] competing layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

GiB = 1 << 30
ZERO_STAGES = ("none", "zero2", "zero3")


# -- shapes ------------------------------------------------------------------------------------------
@dataclass
class MoEShape:
    where: str  # "language_model" | "vision_tower" | "projector"
    layer: int
    num_experts: int
    top_k: int
    hidden_size: int
    ffn_size: int
    kind: str  # "swiglu" | "gelu"
    shared: int
    router: str
    expert_params: int  # one routed expert
    router_params: int
    trainable: bool  # the experts train
    competition: dict[str, float] | None = None  # CompeteSMoE schedule options

    @property
    def matmuls_per_expert(self) -> int:
        """Weights of one expert's matmuls (x @ W elements)."""
        return (3 if self.kind == "swiglu" else 2) * self.hidden_size * self.ffn_size


@dataclass
class LMLayerShape:
    attn_trainable: bool
    norm_trainable: bool
    mlp_trainable: bool  # the dense FFN (when not MoE)
    moe: MoEShape | None


@dataclass
class LMShape:
    family: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: list[LMLayerShape]
    embed_trainable: bool
    head_trainable: bool
    final_norm_trainable: bool

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass
class VisionShape:
    hidden: int
    ffn: int
    heads: int
    patches: int  # per image
    positions: int  # tokens through the blocks: patches (+ CLS)
    patch_size: int
    blocks_run: int  # blocks a forward computes
    trained_from: int | None  # first block whose activations are kept (None: the tower saves nothing)
    trainable: bool  # dense weights train
    activation: str
    moe: dict[int, MoEShape]


@dataclass
class ProjectorShape:
    in_features: int
    out_features: int
    dense_matmul: int  # weight elements of its dense matmuls
    hidden_layers: int  # GELU-separated hidden activations of width out_features
    tokens: int  # image tokens per image
    trainable: bool
    moe: MoEShape | None


@dataclass
class ModelShape:
    vision: VisionShape
    projector: ProjectorShape
    lm: LMShape
    image_tokens: int

    def moe_layers(self) -> list[MoEShape]:
        return [*self.vision.moe.values(), *([self.projector.moe] if self.projector.moe else []),
                *(layer.moe for layer in self.lm.layers if layer.moe is not None)]


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _moe_shape(layer, where: str, idx: int) -> MoEShape:
    c = layer.config
    experts = layer.experts
    per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
    competition = None
    if c.router == "competesmoe":
        o = c.options
        competition = {"warmup_fraction": o.warmup_fraction, "competition_prob": o.competition_prob,
                       "max_competing_layers": o.max_competing_layers}
    return MoEShape(where, idx, c.num_experts, c.top_k, layer.hidden_size, layer.ffn_size, experts.ffn_kind,
                    c.num_shared_experts, c.router, per_expert, sum(p.numel() for p in layer.router.parameters()),
                    _trains(experts), competition)


def model_shape(model: nn.Module) -> ModelShape:
    """The shapes (and what trains) of a `LlavaSmoeForConditionalGeneration`, meta or real."""
    from llava_smoe.model.surgery import decoder_layers
    from llava_smoe.moe import MoELayer

    tower = model.vision_tower
    blocks = tower.blocks()
    vmoe = {i: _moe_shape(b.mlp, "vision_tower", i) for i, b in enumerate(blocks) if isinstance(b.mlp, MoELayer)}
    feature_block = tower.feature_block
    hf = hasattr(tower.model, "config")
    blocks_run = len(blocks) if hf else feature_block + 1  # open_clip stops at the feature block
    first = next((i for i, b in enumerate(blocks[: feature_block + 1]) if _trains(b)), None)
    if hf:
        vc = tower.model.config
        v_hidden, v_ffn, v_heads, act = vc.hidden_size, vc.intermediate_size, vc.num_attention_heads, vc.hidden_act
    else:
        t = tower.model.transformer
        v_hidden, v_heads = t.width, t.resblocks[0].attn.num_heads
        mlp = blocks[next((i for i in range(len(blocks)) if i not in vmoe), 0)].mlp
        v_ffn = vmoe[0].ffn_size if not hasattr(mlp, "c_fc") else mlp.c_fc.out_features
        act = "gelu"
    vision = VisionShape(v_hidden, v_ffn, v_heads, tower.num_patches, tower.num_patches + int(tower.has_cls_token),
                         tower.patch_size, blocks_run, first, _trains_dense(tower), act, vmoe)

    proj = model.projector
    proj_moe = [m for m in proj.modules() if isinstance(m, MoELayer)]
    moe_ids = {id(p) for m in proj_moe for p in m.parameters()}
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear) and id(m.weight) not in moe_ids]
    projector = ProjectorShape(
        tower.hidden_size, model.config.text_config.hidden_size, sum(m.weight.numel() for m in linears),
        max(len(linears) - 1, 0) + (1 if proj_moe else 0), tower.num_image_tokens, _trains(proj),
        _moe_shape(proj_moe[0], "projector", 0) if proj_moe else None)

    lm = model.language_model
    tc = lm.config
    layers = []
    for i, block in enumerate(decoder_layers(lm)):
        moe = _moe_shape(block.mlp, "language_model", i) if isinstance(block.mlp, MoELayer) else None
        norms = [m for n, m in block.named_children() if "norm" in n]
        layers.append(LMLayerShape(_trains(block.self_attn), any(_trains(m) for m in norms),
                                   moe is None and _trains(block.mlp), moe))
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    out = lm.get_output_embeddings()
    lm_shape = LMShape(tc.model_type, tc.hidden_size, tc.intermediate_size, heads,
                       getattr(tc, "num_key_value_heads", None) or heads, head_dim, tc.vocab_size, layers,
                       _trains(lm.get_input_embeddings()), out is not None and _trains(out),
                       _trains(lm.get_decoder().norm))
    return ModelShape(vision, projector, lm_shape, tower.num_image_tokens)


def _trains_dense(tower) -> bool:
    from llava_smoe.moe import MoELayer

    moe_ids = {id(p) for m in tower.modules() if isinstance(m, MoELayer) for p in m.parameters()}
    return any(p.requires_grad for p in tower.parameters() if id(p) not in moe_ids)


# -- parameters ------------------------------------------------------------------------------------------
@dataclass
class ComponentParams:
    name: str
    total: int
    active: int
    trainable: int


def parameter_table(model: nn.Module) -> list[ComponentParams]:
    """Parameters by component: total, used per token (routed experts k of E), trainable."""
    from llava_smoe.moe import MoELayer

    role: dict[int, tuple[str, float]] = {}  # id(param) -> (component, active fraction)
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            part = name.split(".")[0]
            c = module.config
            for p in module.experts.parameters():
                role[id(p)] = (f"{part}: routed experts", min(c.top_k, c.num_experts) / c.num_experts)
            for p in module.router.parameters():
                role[id(p)] = (f"{part}: routers", 1.0)
            if module.shared_experts is not None:
                for p in module.shared_experts.parameters():
                    role[id(p)] = (f"{part}: shared experts", 1.0)
    rows: dict[str, list[int | float]] = {}
    for name, p in model.named_parameters():
        component, fraction = role.get(id(p), (_dense_component(name), 1.0))
        row = rows.setdefault(component, [0, 0.0, 0])
        row[0] += p.numel()
        row[1] += p.numel() * fraction
        row[2] += p.numel() if p.requires_grad else 0
    return [ComponentParams(k, int(v[0]), int(round(v[1])), int(v[2])) for k, v in rows.items()]


def _dense_component(name: str) -> str:
    part = name.split(".")[0]
    if part != "language_model":
        return part
    if "embed_tokens" in name:
        return "language_model: embeddings"
    if name.startswith("language_model.lm_head"):
        return "language_model: output layer"
    if ".self_attn." in name:
        return "language_model: attention"
    if ".mlp." in name:
        return "language_model: dense FFN"
    return "language_model: norms"


# -- precision and model states ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StateBytes:
    weight: int
    grad: int
    optimizer: int


def state_bytes(backend: str, precision: str) -> StateBytes:
    """Bytes per parameter of weights, gradients and AdamW state."""
    if backend == "deepspeed" and precision == "bf16":
        return StateBytes(2, 2, 12)
    return StateBytes(4, 4, 8)


def activation_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


@dataclass
class ModelStates:
    weights: float
    gradients: float
    optimizer: float
    gathered: float = 0.0  # ZeRO-3: parameters gathered for compute
    buckets: float = 0.0  # ZeRO-2/3 communication buckets

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.buckets


def model_states(params: int, trainable: int, gpus: int, stage: str, sb: StateBytes, *,
                 expert_params: int = 0, expert_trainable: int = 0, expert_parallel: int = 1,
                 largest_block: int = 0, zero_config: dict[str, Any] | None = None) -> ModelStates:
    """Weights, gradients and optimizer state per GPU under `stage` ("none", "zero2", "zero3")."""
    z = zero_config or {}
    if stage == "none":
        # Expert parallelism shards the experts (and their gradients and state) over its group.
        shard = expert_params - expert_params / expert_parallel
        shard_t = expert_trainable - expert_trainable / expert_parallel
        return ModelStates(sb.weight * (params - shard), sb.grad * (trainable - shard_t),
                           sb.optimizer * (trainable - shard_t))
    # A bucket holds at most what there is to reduce (gradients) or gather (weights).
    reduce_bucket = sb.grad * min(z.get("reduce_bucket_size", 5e8), trainable)
    if stage == "zero2":
        buckets = reduce_bucket + sb.weight * min(z.get("allgather_bucket_size", 5e8), params)
        return ModelStates(sb.weight * params, sb.grad * trainable / gpus, sb.optimizer * trainable / gpus,
                           buckets=buckets)
    # Gathered for compute: the block in use and the next one prefetched; and every parameter
    # whose next use (forward -> backward) comes within `stage3_max_reuse_distance` fetched
    # elements stays gathered: the last R / 2 of the model. At most `stage3_max_live_parameters`.
    kept = min(float(params), z.get("stage3_max_reuse_distance", 1e9) / 2)
    live = min(float(z.get("stage3_max_live_parameters", 1e9)), max(2.0 * largest_block, kept))
    return ModelStates(sb.weight * params / gpus, sb.grad * trainable / gpus, sb.optimizer * trainable / gpus,
                       gathered=sb.weight * live, buckets=reduce_bucket)


# -- activations -------------------------------------------------------------------------------------------
def moe_saved_per_token(m: MoEShape, b: int, competing: bool) -> float:
    """Bytes an MoE layer keeps per token for the backward, beyond its input (see `moe_keeps_input`)."""
    D, F, E, K = m.hidden_size, m.ffn_size, m.num_experts, m.top_k
    inner = 4 * F if m.kind == "swiglu" else 2 * F  # hidden [2F] (or [F]), activation and product [F]
    router = (4 * D if m.router_params and b < 4 else 0) + 8 * E  # an fp32 copy of the input; probabilities
    shared = m.shared * b * ((D if m.trainable else 0) + inner)
    if competing:
        # Every expert on every token: [T, E, 2F] hidden, [T, E, F] activation and product, and the
        # [T, E, D] outputs (in fp32 for the neural response, and under bf16 also as they are, for
        # the gather of the chosen ones); then the k chosen outputs and the diversity loss's fp32
        # unit vectors (and an fp32 copy of the chosen outputs under bf16).
        outputs = 4 * E * D + (b * E * D if b < 4 else 0)
        return b * E * inner + outputs + b * K * D + 4 * K * D * (2 if b < 4 else 1) + router + shared
    inputs = b * K * D if m.trainable else 0  # the k gathered copies, saved by the first grouped matmul
    return inputs + b * K * inner + b * K * D + router + shared  # + the outputs, for the weighted sum


def moe_keeps_input(m: MoEShape, b: int, competing: bool) -> bool:
    """Whether the layer's input itself is saved: by the router's matmul in fp32, by the
    competition's first batched matmul (every expert reads it in place)."""
    return (b == 4 and m.router_params > 0) or (competing and m.trainable)


def lm_layer_saved_per_token(lm: LMShape, layer: LMLayerShape, b: int, on_path: bool, competing: bool) -> float:
    """Bytes a decoder layer keeps per token (Llama / Qwen2 / Qwen3 / Phi-3 as transformers runs them)."""
    D, q, kv, F = lm.hidden, lm.q, lm.kv, lm.ffn
    trains = layer.attn_trainable or layer.norm_trainable or layer.mlp_trainable or (
        layer.moe is not None and (layer.moe.trainable or layer.moe.router_params > 0))
    on_path = on_path or trains
    if not on_path:
        return 0.0

    def norm(out_saved: bool) -> float:  # RMSNorm: fp32 input (+ normalised if its weight trains) + output
        return 4 * D + 4 + (b * D if layer.norm_trainable else 0) + (b * D if out_saved else 0)

    attn = norm(layer.attn_trainable)
    attn += b * (2 * q + 2 * kv) + 4 * lm.heads  # SDPA: q, k, v, output, log-sum-exp
    if lm.family == "phi3":
        attn += b * (q + kv)  # v is a view of the fused qkv output: the whole output stays alive
    if lm.family == "qwen3":
        attn += (4 + b) * (q + kv)  # per-head RMSNorm of q and k
    attn += b * q if layer.attn_trainable else 0  # o_proj input
    if layer.moe is None:
        mlp = norm(layer.mlp_trainable) + b * 3 * F + (b * F if layer.mlp_trainable else 0)
    else:
        mlp = norm(moe_keeps_input(layer.moe, b, competing)) + moe_saved_per_token(layer.moe, b, competing)
    return attn + mlp


def _largest_per_token(lm: LMShape, layer: LMLayerShape, b: int, competing: bool) -> float:
    """Bytes per token of a layer's largest saved tensor: the FFN's hidden (all E experts' when competing)."""
    m = layer.moe
    if m is None:
        return b * (2 if lm.family == "phi3" else 1) * lm.ffn
    hidden = (2 if m.kind == "swiglu" else 1) * m.ffn_size
    return b * hidden * (m.num_experts if competing else m.top_k)


def tower_saved_per_position(v: VisionShape, b: int, block: int) -> float:
    """Bytes a tower block keeps per position when it trains (LayerNorm, attention, MLP)."""
    D, F = v.hidden, v.ffn
    dense = b * (8 * D) + 4 * 2  # two LayerNorms (input, output), q k v, output, o_proj input
    moe = v.moe.get(block)
    if moe is not None:
        return dense + moe_saved_per_token(moe, b, False) + (b * D if moe_keeps_input(moe, b, False) else 0)
    act_saves = 2 if v.activation in ("quick_gelu",) else 1
    return dense + b * F * (act_saves + 1)


@dataclass
class Activations:
    router_step: float  # bytes per sample at the loss's backward, no layer competing
    competition_step: float  # the same with the most layers competing the schedule allows
    competing_layers: int
    logits: float  # bytes per sample of the logits, held by the output through the backward
    detail: dict[str, float] = field(default_factory=dict)

    def peak(self, micro_batch: int, weight_grads: float, competition: bool = True) -> float:
        """Activation bytes at the backward's peak for a micro-batch: at the loss, or at the end,
        when the weight gradients of the largest tensors are alive beside the logits."""
        per_sample = max(self.router_step, self.competition_step) if competition else self.router_step
        return max(micro_batch * per_sample, micro_batch * self.logits + weight_grads)


def activations_per_sample(shape: ModelShape, seq_len: int, images: int, b: int, checkpointing: bool) -> Activations:
    lm, v, p = shape.lm, shape.vision, shape.projector
    S = seq_len
    detail: dict[str, float] = {}
    # The vision tower: from its first trained block to the feature block.
    tower = 0.0
    if v.trained_from is not None:
        blocks = range(v.trained_from, v.blocks_run)
        per_block = [tower_saved_per_position(v, b, i) * v.positions * images for i in blocks]
        tower = (b * v.hidden * v.positions * images * len(per_block) + max(per_block)) if checkpointing and per_block \
            else sum(per_block)
    detail["vision_tower"] = tower
    upstream = v.trained_from is not None
    # The projector, on the image tokens.
    proj = 0.0
    if p.trainable or upstream:
        proj = (b * p.in_features + 2 * b * p.out_features * p.hidden_layers) * p.tokens * images
    detail["projector"] = proj
    upstream = upstream or p.trainable or lm.embed_trainable

    competes = [i for i, layer in enumerate(lm.layers) if layer.moe is not None and layer.moe.competition]
    m = _max_competing(shape)
    worst = set(competes[:m])  # every LM MoE layer has one shape: which ones compete does not matter
    router_layers, competition_layers = [], []  # (kept bytes, largest tensor's bytes) per layer
    on_path = upstream
    for i, layer in enumerate(lm.layers):
        for kept, competing in ((router_layers, False), (competition_layers, i in worst)):
            saved = lm_layer_saved_per_token(lm, layer, b, on_path, competing) * S
            kept.append((saved, _largest_per_token(lm, layer, b, competing) * S if saved else 0.0))
        on_path = on_path or router_layers[-1][0] > 0
    # The output: final norm, lm_head input, logits (held by the output) and the loss's fp32 tensors.
    head_in = b * lm.hidden * S if lm.head_trainable else 0
    final = (4 * lm.hidden + 4 + b * lm.hidden) * S if on_path else 0
    logits = b * lm.vocab * S
    loss_peak = 12 * lm.vocab * S if on_path or lm.head_trainable else 0
    detail["output_and_loss"] = head_in + final + logits + loss_peak
    rest = tower + proj + head_in + final + logits

    def total(layers: list[tuple[float, float]]) -> float:
        if not checkpointing:
            return rest + sum(saved for saved, _ in layers) + loss_peak
        inputs = b * lm.hidden * S * sum(1 for saved, _ in layers if saved > 0)  # each layer keeps its input
        # The backward recomputes one layer at a time: its saved tensors and the gradient of its largest.
        return rest + inputs + max(loss_peak, max((saved + grad for saved, grad in layers), default=0.0))

    detail["language_model_layers"] = sum(saved for saved, _ in router_layers)
    return Activations(total(router_layers), total(competition_layers), len(worst), logits, detail)


def weight_grad_transient(model: nn.Module, grad_bytes: int) -> float:
    """Bytes of weight gradients alive at once in the backward, beyond the kept gradients: the
    largest trained tensor's, computed before it is added (or reduced) into its gradient; for
    trained embeddings tied to the output layer, the output layer's gradient waits for the
    embedding's and both are summed: three such tensors."""
    lm = model.language_model
    embed = lm.get_input_embeddings().weight
    out = lm.get_output_embeddings()
    if embed.requires_grad and out is not None and out.weight is embed:
        return 3.0 * grad_bytes * embed.numel()
    return float(grad_bytes * max((p.numel() for p in model.parameters() if p.requires_grad), default=0))


def competition_tensors(m: MoEShape, tokens: int, b: int) -> dict[str, float]:
    """Bytes of a competition step's every-expert tensors in one MoE layer, for `tokens` tokens."""
    hidden = 2 * m.ffn_size if m.kind == "swiglu" else m.ffn_size
    return {"outputs_TED": float(tokens * m.num_experts * m.hidden_size * b),
            "hidden_TEF2": float(tokens * m.num_experts * hidden * b),
            "shape_TED": [tokens, m.num_experts, m.hidden_size],
            "shape_TEF2": [tokens, m.num_experts, hidden]}


# -- the schedule ---------------------------------------------------------------------------------------------
def _competition_options(shape: ModelShape) -> dict[str, float] | None:
    layers = [m for m in shape.moe_layers() if m.competition]
    return layers[0].competition if layers else None


def _max_competing(shape: ModelShape) -> int:
    """The most CompeteSMoE layers one step can have competing."""
    o = _competition_options(shape)
    n = sum(1 for m in shape.moe_layers() if m.competition)
    if o is None or o["competition_prob"] <= 0 or o["warmup_fraction"] >= 1:
        return 0
    return min(n, int(o["max_competing_layers"]))


def expected_competing_layers(n: int, prob: float, max_layers: int, warmup_fraction: float) -> float:
    """(1 - w) E[min(Binomial(n, p), m)]: competing layers per step, averaged over the run."""
    mean = sum(min(j, max_layers) * math.comb(n, j) * prob**j * (1 - prob) ** (n - j) for j in range(n + 1))
    return (1 - warmup_fraction) * mean


# -- FLOPs -----------------------------------------------------------------------------------------------------
def _factor(trainable: bool, upstream: bool) -> int:
    """Matmul passes: forward, input gradient (if anything upstream trains), weight gradient."""
    return 1 + int(upstream) + int(trainable)


def moe_forward_flops(m: MoEShape, competing: bool) -> float:
    """Forward FLOPs per token of an MoE layer's router and experts."""
    experts = m.num_experts if competing else m.top_k
    return 2 * m.hidden_size * m.num_experts + 2 * (experts + m.shared) * m.matmuls_per_expert


@dataclass
class Flops:
    router_step: float  # training FLOPs per sample, no layer competing
    competition_step: float  # with the most layers competing the schedule allows
    per_competing_layer: float  # extra of one competing LM MoE layer
    schedule_mean: float
    expected_competing_layers: float
    forward_router_step: float


def training_flops(shape: ModelShape, seq_len: int, images: int) -> Flops:
    lm, v, p = shape.lm, shape.vision, shape.projector
    S = seq_len
    extra: list[tuple[str, float]] = []  # per CompeteSMoE layer: (where, extra training FLOPs per sample)
    total = forward = 0.0
    # Vision tower, per image.
    upstream = False
    P, D, F = v.positions, v.hidden, v.ffn
    patch = 2 * 3 * v.patch_size**2 * D * v.patches
    total += patch * _factor(v.trainable, False) * images
    forward += patch * images
    for i in range(v.blocks_run):
        moe = v.moe.get(i)
        dense_mm = 2 * 4 * D * D * P
        scores = 4 * P * D * P
        mlp = moe_forward_flops(moe, False) * P if moe else 2 * 2 * D * F * P
        mlp_train = moe.trainable if moe else v.trainable
        block = dense_mm * _factor(v.trainable, upstream) + scores * (1 + 2 * int(upstream or v.trainable)) \
            + mlp * _factor(mlp_train, upstream or v.trainable)
        total += block * images
        forward += (dense_mm + scores + mlp) * images
        if moe and moe.competition:
            extra.append(("vision_tower", (moe_forward_flops(moe, True) - moe_forward_flops(moe, False)) * P * images
                          * _factor(moe.trainable, upstream or v.trainable)))
        upstream = upstream or v.trainable or mlp_train
    # Projector, per image token.
    proj = 2 * p.dense_matmul + (moe_forward_flops(p.moe, False) if p.moe else 0)
    total += proj * p.tokens * images * _factor(p.trainable, upstream)
    forward += proj * p.tokens * images
    upstream = upstream or p.trainable or lm.embed_trainable
    # Language model, per token.
    Dl, q, kv = lm.hidden, lm.q, lm.kv
    for layer in lm.layers:
        attn = 2 * Dl * (q + 2 * kv) + 2 * q * Dl
        scores = 4 * S * q
        m = layer.moe
        mlp = moe_forward_flops(m, False) if m else 2 * 3 * Dl * lm.ffn
        mlp_train = m.trainable if m else layer.mlp_trainable
        attn_up = upstream or layer.attn_trainable
        total += S * (attn * _factor(layer.attn_trainable, upstream) + scores * (1 + 2 * int(attn_up))
                      + mlp * _factor(mlp_train, attn_up or layer.norm_trainable))
        forward += S * (attn + scores + mlp)
        if m and m.competition:
            extra.append(("language_model", (moe_forward_flops(m, True) - moe_forward_flops(m, False)) * S
                          * _factor(mlp_train, True)))
        upstream = attn_up or mlp_train or layer.norm_trainable
    head = 2 * Dl * lm.vocab * S
    total += head * _factor(lm.head_trainable, upstream)
    forward += head
    o = _competition_options(shape)
    n = len(extra)
    expected = expected_competing_layers(n, o["competition_prob"], int(o["max_competing_layers"]),
                                         o["warmup_fraction"]) if o and n else 0.0
    worst = sum(sorted((e for _, e in extra), reverse=True)[:_max_competing(shape)])
    mean_extra = sum(e for _, e in extra) / n * expected if n else 0.0
    per_lm_layer = next((e for where, e in extra if where == "language_model"), 0.0)
    return Flops(total, total + worst, per_lm_layer, total + mean_extra, expected, forward)


# -- the plan ---------------------------------------------------------------------------------------------------
def max_micro_batch(usable: float, static: float, acts: Activations, weight_grads: float, competition: bool) -> int:
    """The largest micro-batch m with static + acts.peak(m) <= usable."""
    per_sample = max(acts.router_step, acts.competition_step) if competition else acts.router_step
    room = usable - static
    if room <= 0 or room < weight_grads:
        return 0
    return max(int(min(room // per_sample, (room - weight_grads) // max(acts.logits, 1.0))), 0)

