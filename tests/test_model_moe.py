"""MoE surgery on the VLM: placement, upcycled parity, reload from config alone."""

from __future__ import annotations

import pytest
import torch

from llava_smoe.model import (
    LlavaSmoeConfig,
    LlavaSmoeForConditionalGeneration,
    MoEPlacement,
    MoEProjector,
    build_language_model,
    build_model,
    build_projector,
    decoder_layers,
    lm_moe,
    upcycle,
    upcycle_projector,
)
from llava_smoe.model.surgery import upcycle_layers
from llava_smoe.moe import MoEConfig, MoELayer, collect_aux_losses, moe_layers
from llava_smoe.moe.config import resolve_layers
from llava_smoe.testing import tiny_model_config, tiny_text_config

load_model = LlavaSmoeForConditionalGeneration.from_pretrained

T = 16


def _dense(vision="clip", family="qwen2", **kw):
    torch.manual_seed(0)
    return build_model(tiny_model_config(vision, family, **kw)).eval()


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.image_token_id, (2, 28), generator=g)
    ids[:, 3:3 + T] = model.config.image_token_id
    return ids, torch.randn(2, 3, 32, 32, generator=g)


def _logits(model, ids, px):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits


def _moe(router="smoe", **kw):
    return MoEConfig(num_experts=4, top_k=2, router=router, **kw)


def test_resolve_layers():
    assert resolve_layers("every_other", 6) == [1, 3, 5]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("none", 3) == []
    assert resolve_layers([3, 0, 3], 4) == [0, 3]
    with pytest.raises(ValueError, match=r"layer indices \[4\] are out of range"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match=r"language_model: 'odd' is not one of \['all', 'every_other', 'none'\]"):
        MoEPlacement(language_model="odd")


@pytest.mark.parametrize("router", ["smoe", "competesmoe"])
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_upcycled_model_matches_dense(router, family):
    model = _dense("clip", family)
    ids, px = _batch(model)
    dense = _logits(model, ids, px)
    upcycle(model, _moe(router), language_model="every_other")
    layers = model.language_model.model.layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoELayer)] == [1, 3]
    torch.testing.assert_close(_logits(model, ids, px), dense, rtol=1e-4, atol=1e-5)
    assert lm_moe(model.config.text_config).moe_config.router == router


def test_build_with_moe_equals_dense_build_and_reloads(tmp_path):
    dense = _dense("open_clip", "llama")
    torch.manual_seed(0)
    moe = build_model(tiny_model_config("open_clip", "llama", moe=_moe("competesmoe"),
                                        moe_placement={"language_model": "all"})).eval()
    assert len(moe_layers(moe)) == 4
    ids, px = _batch(moe)
    ref = _logits(moe, ids, px)
    torch.testing.assert_close(ref, _logits(dense, ids, px), rtol=1e-4, atol=1e-5)
    # per-step MoE state is in buffers and travels with the checkpoint
    router = moe_layers(moe)[0][1].router
    router.step.fill_(7)
    moe.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert [n for n, _ in moe_layers(reloaded)] == [n for n, _ in moe_layers(moe)]
    assert int(moe_layers(reloaded)[0][1].router.step) == 7
    torch.testing.assert_close(_logits(reloaded, ids, px), ref, rtol=0, atol=0)


def test_upcycled_checkpoint_reloads_from_config_alone(tmp_path):
    model = _dense("siglip", "qwen3")
    upcycle(model, _moe("smoe", upcycle_noise=0.01), language_model=[0, 2])
    ids, px = _batch(model)
    ref = _logits(model, ids, px)
    model.save_pretrained(tmp_path)
    cfg = LlavaSmoeConfig.from_pretrained(tmp_path)
    recorded = lm_moe(cfg.text_config)
    assert recorded.moe_config.upcycle_noise == 0.01 and recorded.layers == [0, 2]
    reloaded = load_model(str(tmp_path))
    torch.testing.assert_close(_logits(reloaded, ids, px), ref, rtol=0, atol=0)


def test_surgery_applies_once():
    model = _dense()
    upcycle(model, _moe())
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(model, _moe())


def test_vision_tower_moe_placement():
    model = _dense("clip", "qwen2")
    ids, px = _batch(model)
    dense = _logits(model, ids, px)
    with pytest.raises(ValueError, match=r"blocks \[2\] come after the feature layer"):
        upcycle(model, _moe(), language_model="none", vision_tower=[1, 2])
    model = _dense("clip", "qwen2")
    upcycle(model, _moe(), language_model="none", vision_tower="all")  # blocks up to the feature layer
    blocks = model.vision_tower.blocks()
    assert [isinstance(b.mlp, MoELayer) for b in blocks] == [True, True, False]
    # CLIP's quick_gelu FFN upcycles exactly; the tower's MoE layers are trainable, the rest frozen
    torch.testing.assert_close(_logits(model, ids, px), dense, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in blocks[0].mlp.parameters())
    assert not blocks[0].self_attn.q_proj.weight.requires_grad


def test_open_clip_tower_moe_reloads(tmp_path):
    model = _dense("open_clip", "qwen2")
    ids, px = _batch(model)
    dense = _logits(model, ids, px)
    upcycle(model, _moe("competesmoe"), language_model="every_other", vision_tower=[1])
    torch.testing.assert_close(_logits(model, ids, px), dense, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert isinstance(reloaded.vision_tower.blocks()[1].mlp, MoELayer)
    assert any(p.requires_grad for p in reloaded.vision_tower.blocks()[1].mlp.parameters())
    assert not any(p.requires_grad for p in reloaded.vision_tower.blocks()[0].parameters())
    torch.testing.assert_close(_logits(reloaded, ids, px), _logits(model, ids, px), rtol=0, atol=0)


def test_projector_upcycle_and_moe_projector(tmp_path):
    dense_proj = build_projector({"type": "mlp3x_gelu"}, 24, 32)
    x = torch.randn(2, 5, 24)
    moe_proj = upcycle_projector(dense_proj, _moe())
    assert isinstance(moe_proj, MoEProjector)
    torch.testing.assert_close(moe_proj(x), dense_proj(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mlp3x_gelu"):
        upcycle_projector(build_projector({"type": "mlp2x_gelu"}, 24, 32), _moe())

    model = _dense(projector={"type": "mlp3x_gelu"})
    ids, px = _batch(model)
    dense = _logits(model, ids, px)
    upcycle(model, _moe(), language_model="every_other", projector=True)
    assert model.config.projector_config["type"] == "moe" and isinstance(model.projector, MoEProjector)
    torch.testing.assert_close(_logits(model, ids, px), dense, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert isinstance(reloaded.projector, MoEProjector) and len(moe_layers(reloaded)) == 3
    torch.testing.assert_close(_logits(reloaded, ids, px), _logits(model, ids, px), rtol=0, atol=0)


def test_upcycling_keeps_the_projector_position_embedding(tmp_path):
    model = _dense(projector={"type": "mlp3x_gelu", "position_embedding": True})
    assert model.projector.position_embedding.shape == (T, model.config.text_config.hidden_size)
    with torch.no_grad():
        model.projector.position_embedding.normal_()
    ids, px = _batch(model)
    dense = _logits(model, ids, px)
    upcycle(model, _moe(), language_model="every_other", projector=True)
    assert {k: model.config.projector_config[k] for k in ("type", "bias", "position_embedding")} == {
        "type": "moe", "bias": True, "position_embedding": True}
    assert model.config.projector_config["moe_config"]["router"] == "smoe"
    assert isinstance(model.projector.base, MoEProjector)
    torch.testing.assert_close(_logits(model, ids, px), dense, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    torch.testing.assert_close(reloaded.projector.position_embedding, model.projector.position_embedding)
    torch.testing.assert_close(_logits(reloaded, ids, px), _logits(model, ids, px), rtol=0, atol=0)


def test_training_step_yields_aux_losses_and_expert_gradients():
    model = _dense()
    upcycle(model, _moe("smoe"))
    model.train()
    ids, px = _batch(model)
    out = model(input_ids=ids, pixel_values=px, labels=ids)
    aux = collect_aux_losses(model)
    assert aux and all(torch.isfinite(v) for v in aux.values())
    (out.loss + sum(aux.values())).backward()
    for _, layer in moe_layers(model):
        assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


def test_natively_moe_language_model_is_refused():
    lm = build_language_model(tiny_text_config("qwen3", model_type="qwen3_moe", num_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=16))
    with pytest.raises(ValueError, match="language model layer 0: cannot upcycle"):
        upcycle_layers(decoder_layers(lm), [0], _moe(), where="language model")
