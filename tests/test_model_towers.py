"""Vision towers and projectors, on tiny configs (CPU, no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_smoe.config import parse
from llava_smoe.model import (
    MLPProjector,
    PositionedProjector,
    ProjectorConfig,
    VisionTowerConfig,
    build_projector,
    build_vision_tower,
)
from llava_smoe.testing import tiny_vision_config


def _pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, tokens, cls", [("clip", 16, True), ("siglip", 16, False), ("open_clip", 16, True)])
def test_tower_shapes_and_preprocessing(kind, tokens, cls):
    tower = build_vision_tower(tiny_vision_config(kind))
    feats = tower(_pixels())
    assert feats.shape == (2, tokens, 32)
    assert tower.num_patches == 16 and tower.num_image_tokens == tokens
    assert tower.image_size == 32 and tower.has_cls_token is cls
    expected_mean = (0.5, 0.5, 0.5) if kind == "siglip" else pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tower.image_mean == expected_mean
    assert not any(p.requires_grad for p in tower.parameters()), "towers are frozen by default"


def test_hf_clip_feature_layer_matches_hidden_states():
    tower = build_vision_tower(tiny_vision_config("clip", feature_layer=-2))
    px = _pixels()
    hidden = tower.model(px, output_hidden_states=True).hidden_states
    assert len(hidden) == 4  # embeddings + 3 blocks
    torch.testing.assert_close(tower(px), hidden[-2][:, 1:])
    with_cls = build_vision_tower(tiny_vision_config("clip", feature_select="cls_patch"))
    with_cls.load_state_dict(tower.state_dict())
    out = with_cls(px)
    assert out.shape == (2, 17, 32) and with_cls.num_image_tokens == 17
    torch.testing.assert_close(out, hidden[-2])


def test_open_clip_feature_layer_matches_manual_blocks():
    tower = build_vision_tower(tiny_vision_config("open_clip", feature_select="cls_patch"))
    px = _pixels()
    visual = tower.model
    x = visual._embeds(px)
    for block in visual.transformer.resblocks[:2]:  # -2 of 3 blocks: output of block index 1
        x = block(x)
    torch.testing.assert_close(tower(px), x)
    last = build_vision_tower(tiny_vision_config("open_clip", feature_layer=-1))
    last.load_state_dict(tower.state_dict())
    torch.testing.assert_close(last(px), visual.transformer.resblocks[2](x)[:, 1:])


def test_siglip_rejects_cls_patch():
    with pytest.raises(ValueError, match="no CLS token"):
        build_vision_tower(tiny_vision_config("siglip", feature_select="cls_patch"))


@pytest.mark.parametrize("layer", [4, -5, 0])
def test_feature_layer_out_of_range(layer):
    with pytest.raises(ValueError, match="feature_layer"):
        build_vision_tower(tiny_vision_config("clip", feature_layer=layer))


@pytest.mark.parametrize("kind", ["clip", "siglip", "open_clip"])
def test_resolved_config_rebuilds_same_architecture(kind):
    tower = build_vision_tower(tiny_vision_config(kind))
    resolved = tower.resolved_config().to_dict()
    rebuilt = build_vision_tower(parse(VisionTowerConfig, resolved), load_weights=False)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in tower.state_dict().items()}
    rebuilt.load_state_dict(tower.state_dict())
    px = _pixels()
    torch.testing.assert_close(rebuilt(px), tower(px))


def test_hf_tower_from_local_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=32, patch_size=8))
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}')
    tower = build_vision_tower({"backend": "hf", "name_or_path": str(tmp_path)})
    px = _pixels()
    torch.testing.assert_close(tower(px), hf(px, output_hidden_states=True).hidden_states[-2][:, 1:])
    assert tower.image_mean == (0.1, 0.2, 0.3) and tower.image_std == (1.0, 1.0, 1.0)
    assert tower.resolved_config().hf_config["model_type"] == "clip_vision_model"


def test_open_clip_from_config_file_and_checkpoint(tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = tiny_vision_config("open_clip")
    model_cfg = cfg.pop("open_clip_model_config")
    path = tmp_path / "my-tiny-vit.json"
    path.write_text(json.dumps(model_cfg))
    tower = build_vision_tower({**cfg, "name_or_path": "my-tiny-vit", "open_clip_model_config_path": str(path)})
    assert tower.resolved_config().open_clip_model_config == model_cfg  # rebuildable without the file

    import open_clip

    clip = open_clip.create_model("my-tiny-vit", pretrained=None)
    save_file(clip.state_dict(), tmp_path / "ckpt.safetensors")
    loaded = build_vision_tower({**cfg, "name_or_path": "my-tiny-vit", "open_clip_model_config": model_cfg,
                                 "pretrained": str(tmp_path / "ckpt.safetensors")})
    for name, value in clip.visual.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)


@pytest.mark.parametrize("kind", ["clip", "siglip", "open_clip"])
def test_a_frozen_tower_can_keep_its_position_embedding_trainable(kind):
    tower = build_vision_tower({**tiny_vision_config(kind), "freeze_except": ["*position*embedding*"]})
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and "position" in trainable[0], trainable
    tower(_pixels()).sum().backward()
    grads = {n: p.grad for n, p in tower.named_parameters()}
    assert grads[trainable[0]].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n != trainable[0])
    with pytest.raises(ValueError, match="'no_such_weight' matches none of the tower's parameters"):
        build_vision_tower({**tiny_vision_config(kind), "freeze_except": ["no_such_weight"]})


def test_vision_config_validation():
    with pytest.raises(ValueError, match="backend"):
        VisionTowerConfig(backend="timm")
    with pytest.raises(ValueError, match="unknown key 'select_layer'"):
        parse(VisionTowerConfig, {"backend": "hf", "name_or_path": "x", "select_layer": -2})
    with pytest.raises(ValueError, match="model_type"):
        VisionTowerConfig(hf_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="open_clip has no model"):
        build_vision_tower({"backend": "open_clip", "name_or_path": "no-such-model"})


# -- projectors --

@pytest.mark.parametrize("kind, n_linear", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_types(kind, n_linear):
    proj = build_projector({"type": kind}, 24, 32)
    assert sum(isinstance(m, nn.Linear) for m in proj.modules()) == n_linear
    assert proj(torch.randn(2, 5, 24)).shape == (2, 5, 32)
    if kind.startswith("mlp"):
        assert isinstance(proj, MLPProjector) and isinstance(proj[1], nn.GELU)


def test_identity_projector_and_errors():
    assert isinstance(build_projector({"type": "identity"}, 32, 32), nn.Identity)
    with pytest.raises(ValueError, match="equal widths"):
        build_projector({"type": "identity"}, 24, 32)
    with pytest.raises(ValueError, match="mlp\\{N\\}x_gelu"):
        ProjectorConfig(type="mlp2x_relu")
    with pytest.raises(ValueError, match="needs an MoE config"):
        build_projector({"type": "moe"}, 24, 32)


def test_position_embedding_starts_as_the_plain_projector_and_gives_each_token_its_own_vector():
    torch.manual_seed(0)
    plain = build_projector({"type": "mlp2x_gelu"}, 24, 32)
    torch.manual_seed(0)
    proj = build_projector({"type": "mlp2x_gelu", "position_embedding": True}, 24, 32, num_tokens=5)
    assert isinstance(proj, PositionedProjector) and proj.position_embedding.shape == (5, 32)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(proj(x), plain(x), rtol=0, atol=0)  # zero at the start

    # After a step the same feature at two positions projects to two different vectors.
    same_BTC = torch.randn(1, 1, 24).expand(3, 5, 24)
    proj(same_BTC).pow(2).mean().backward()
    assert proj.position_embedding.grad.abs().sum() > 0
    with torch.no_grad():
        proj.position_embedding.add_(torch.randn(5, 32))
        out = proj(same_BTC)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_position_embedding_errors():
    with pytest.raises(ValueError, match="needs the number of image tokens"):
        build_projector({"type": "linear", "position_embedding": True}, 24, 32)
    proj = build_projector({"type": "linear", "position_embedding": True}, 24, 32, num_tokens=4)
    with pytest.raises(ValueError, match="has 4 positions but the vision tower gave 5 tokens"):
        proj(torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="unknown key 'pos'"):
        parse(ProjectorConfig, {"type": "linear", "pos": True})
