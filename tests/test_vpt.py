"""VPT-deep on a tiny random open_clip VisionTransformer."""
import json

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import TINY_CLIP


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny-clip-vpt.json"
    path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model, _, _, _ = common.load_clip(str(path), "none")
    return model


def test_zero_prompts_equal_encode_image(clip):
    images = torch.randn(3, 3, 32, 32)
    vpt = common.PromptedVisual(clip.visual, num_tokens=0, depth=12)
    with torch.no_grad():
        assert torch.allclose(vpt(images), clip.encode_image(images), atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_prompts_change_features(clip, depth):
    images = torch.randn(2, 3, 32, 32)
    vpt = common.PromptedVisual(clip.visual, num_tokens=4, depth=depth)
    assert vpt.prompts.shape == (depth, 4, 64)
    bound = (6 / (3 * 8 * 8 + 64)) ** 0.5
    assert vpt.prompts.abs().max() <= bound
    with torch.no_grad():
        out = vpt(images)
    assert out.shape == (2, 32)
    assert not torch.allclose(out, clip.encode_image(images))


def test_only_trainable_parts_get_gradients_and_clip_is_unchanged(clip):
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    vpt = common.PromptedVisual(clip.visual, num_tokens=4, depth=2)
    vpt.train()
    assert not clip.visual.training  # the frozen backbone stays in eval mode
    w_cls = torch.nn.Parameter(torch.randn(5, 32))
    w_llm = torch.nn.Parameter(torch.zeros(5, 3))
    desc = F.normalize(torch.randn(5, 3, 32), dim=-1)
    mask = torch.ones(5, 3, dtype=torch.bool)
    opt = torch.optim.AdamW([vpt.prompts, w_cls, w_llm], lr=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    v = F.normalize(vpt(torch.randn(4, 3, 32, 32)), dim=-1)
    loss = F.cross_entropy(common.cosine_logits(v, w_cls, 25.0), labels) + \
        F.cross_entropy(50 * common.descriptor_scores(v, desc, mask, w_llm), labels)
    loss.backward()
    for name, p in clip.named_parameters():
        assert p.grad is None, name
    for t in (vpt.prompts, w_cls, w_llm):
        assert t.grad is not None and t.grad.abs().sum() > 0
    opt.step()
    after = clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainable = [n for n, p in vpt.named_parameters() if p.requires_grad]
    assert trainable == ["prompts"]


@pytest.fixture(scope="module")
def resnet_clip(tmp_path_factory):
    """A tiny ResNet CLIP (open_clip's ModifiedResNet), as MODEL=RN50 builds it."""
    config = dict(TINY_CLIP, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8})
    path = tmp_path_factory.mktemp("cfg") / "tiny-rn.json"
    path.write_text(json.dumps(config))
    model, _, _, _ = common.load_clip(str(path), "none")
    return model


def test_a_resnet_tower_is_refused_for_prompts_by_name_and_runs_without_them(resnet_clip):
    # before: AttributeError "'ModifiedResNet' object has no attribute 'transformer'", with a linear probe too
    with pytest.raises(ValueError, match="ModifiedResNet.*MODEL=ViT-B-16-quickgelu"):
        common.PromptedVisual(resnet_clip.visual, num_tokens=2, depth=12)
    with pytest.raises(ValueError, match="^LIFT's lora tuner: .*ModifiedResNet"):
        common.vit_blocks(resnet_clip.visual, "LIFT's lora tuner")
    probe = common.PromptedVisual(resnet_clip.visual, num_tokens=0, depth=12)
    assert probe.prompts.numel() == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(probe(images), resnet_clip.encode_image(images))
