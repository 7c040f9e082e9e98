import time

import pytest
import torch
import torch.nn.functional as F

from raybench.complexity import complexity
from raybench.configs import FAMILIES, HFConfig, ResNetConfig, SwinConfig, ViTConfig
from raybench.models import FAMILIES as REGISTERED, WeightsUnavailable, build_model


def test_fused_attention_matches_the_plain_softmax_path():
    torch.manual_seed(0)
    vit = build_model(ViTConfig(4, 64, 2, 4, 2.0)).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(3, 65, 64)
    torch.testing.assert_close(attn(x, fused=True), attn(x, fused=False), rtol=1e-5, atol=1e-5)


def test_tiny_models_cover_every_built_in_family_and_variant(tiny_models):
    cfgs = tiny_models.values()
    assert {c.family for c in cfgs} == set(FAMILIES) == set(REGISTERED)  # every config class has its family
    assert {c.stem for c in cfgs if c.family == "resnet"} == {"cifar", "imagenet"}
    assert {c.finetune for c in cfgs if c.family == "swin"} == {True, False}
    assert {c.frozen_backbone for c in cfgs if c.family == "hf"} == {True, False}


@pytest.mark.parametrize("family", REGISTERED)
def test_every_registered_family_builds_counts_and_trains_exactly_its_trainable_parameters(family, tiny_models):
    """timm's habit: every registered family, through its tiny test configs (conftest.tiny_models)."""
    names = [n for n, c in tiny_models.items() if c.family == family]
    assert names, f"family {family!r} has no tiny test config in conftest.tiny_models"
    for name in names:
        cfg = tiny_models[name]
        torch.manual_seed(0)
        model = build_model(cfg).train()
        cx = complexity(cfg)
        assert (cx.params, cx.trainable_params) == (sum(p.numel() for p in model.parameters()),
                                                    sum(p.numel() for p in model.parameters() if p.requires_grad))
        assert cx.flops > 0 and cx.input_size == model.input_size
        x = torch.randn(2, 3, model.input_size, model.input_size)
        logits = model(x)
        assert logits.shape == (2, cfg.num_classes)
        loss = F.cross_entropy(logits, torch.tensor([0, 1]))
        assert torch.isfinite(loss)
        loss.backward()
        params = dict(model.named_parameters())
        # a frozen backbone (Swin, hf: fine-tune) trains the new head only; every other model trains everything
        expected = {"hf.classifier.weight", "hf.classifier.bias"} if name in ("swin-ft", "hf-ft") else set(params)
        assert {n for n, p in params.items() if p.requires_grad} == expected
        assert {n for n, p in params.items() if p.grad is not None} == expected  # none on frozen parameters
        assert all(torch.isfinite(params[n].grad).all() and params[n].grad.abs().sum() > 0 for n in expected), \
            [n for n in expected if not params[n].grad.abs().sum() > 0]


def test_a_family_registers_once():
    from raybench.models.registry import register
    with pytest.raises(ValueError, match="'vit' is registered twice"):
        register(REGISTERED["vit"])


def test_swin_is_the_hf_classifier_with_swin_presets(tiny_swin_dir):
    swin, hf = (build_model(cfg) for cfg in (SwinConfig(tiny_swin_dir, finetune=True, num_classes=10),
                                              HFConfig(tiny_swin_dir, finetune=True, num_classes=10)))
    assert type(swin) is type(hf) and (swin.input_size, swin.mean, swin.std) == (hf.input_size, hf.mean, hf.std)
    torch.testing.assert_close(swin.hf.swin.embeddings.patch_embeddings.projection.weight,
                               hf.hf.swin.embeddings.patch_embeddings.projection.weight)


def test_swin_fine_tune_loads_through_from_pretrained_and_freezes_the_backbone(tiny_swin_dir):
    model = build_model(SwinConfig(tiny_swin_dir, finetune=True, num_classes=100))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"hf.classifier.weight", "hf.classifier.bias"}
    model.train()
    assert not model.hf.swin.training  # frozen backbone stays deterministic
    from transformers import SwinForImageClassification
    saved = SwinForImageClassification.from_pretrained(tiny_swin_dir)
    torch.testing.assert_close(model.hf.swin.embeddings.patch_embeddings.projection.weight,
                               saved.swin.embeddings.patch_embeddings.projection.weight)


def test_offline_hub_swin_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="HF_HOME.*save_pretrained"):
        build_model(SwinConfig("microsoft/swin-small-patch4-window7-224", finetune=True))
    assert time.perf_counter() - t0 < 10


def test_offline_resnet_weights_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="TORCH_HOME"):
        build_model(ResNetConfig("imagenet", pretrained=True, image_size=224))
    assert time.perf_counter() - t0 < 10


def test_cached_resnet_weights_load_through_torchvision(monkeypatch, tmp_path):
    """A weights file in torchvision's cache is used as is (the path users get after one download)."""
    from torchvision.models import resnet18
    from raybench.models.resnet import torchvision_weights_path
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = torchvision_weights_path()
    path.parent.mkdir(parents=True)
    reference = resnet18()
    torch.save(reference.state_dict(), path)
    model = build_model(ResNetConfig("imagenet", pretrained=True, image_size=224))
    torch.testing.assert_close(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.fc.out_features == 100 and model.mean == pytest.approx((0.485, 0.456, 0.406))
