import pytest
import torch

from selfsup.backbones import BACKBONES, CPU_DEFAULT_BACKBONE, build_backbone
from selfsup.heads import ProjectionHead

# Reference counts without the fc layer: torchvision resnet18/50 have 11.69M / 25.56M with fc.
EXPECTED_PARAMS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032,
                   "resnet101": 42_500_160, "resnet152": 58_143_808}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_match_torchvision(name):
    with torch.device("meta"):
        model = build_backbone(name, image_size=224)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_module_names_match_torchvision():
    import torchvision

    ours = build_backbone("resnet50", image_size=224)
    tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    ours.eval(), tv.eval()
    torch.testing.assert_close(ours(x), tv(x))


def test_every_registered_backbone_builds_on_meta():
    for name in BACKBONES:
        with torch.device("meta"):
            m = build_backbone(name, image_size=32)
        assert m.num_features > 0


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_small_stem_auto_and_channels(channels):
    m = build_backbone("resnet18", in_channels=channels, image_size=28, width=0.125)
    assert m.small_stem and isinstance(m.maxpool, torch.nn.Identity) and m.conv1.stride == (1, 1)
    out = m(torch.randn(2, channels, 28, 28))
    assert out.shape == (2, m.num_features) == (2, 64)
    big = build_backbone("resnet18", image_size=96, width=0.125)
    assert not big.small_stem and big.conv1.kernel_size == (7, 7)
    assert build_backbone("resnet18", image_size=96, small_stem=True, width=0.125).small_stem


def test_width_multiplier_and_default():
    assert build_backbone("resnet50", width=2.0, image_size=32).num_features == 4096
    cpu = build_backbone(CPU_DEFAULT_BACKBONE, in_channels=1, image_size=28)
    assert cpu(torch.randn(2, 1, 28, 28)).shape == (2, cpu.num_features)
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0.0)


def test_unknown_backbone_suggests():
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet5O")


def test_projection_head_layers():
    head = ProjectionHead(8, 16, 4, num_layers=3)
    outs = head(torch.randn(5, 8), return_all=True)
    assert [o.shape[1] for o in outs] == [8, 16, 16, 4]
    assert [head.layer_dim(k) for k in range(4)] == [8, 16, 16, 4]
    # Hidden layers are Linear-BN-ReLU, the last is a plain Linear.
    assert [type(m).__name__ for m in head.layers[0]] == ["Linear", "BatchNorm1d", "ReLU"]
    assert [type(m).__name__ for m in head.layers[-1]] == ["Linear"]
    assert (outs[1] >= 0).all() and (outs[3] < 0).any()
    assert torch.equal(head(torch.ones(3, 8) * 0 + outs[0][:3]), head(outs[0][:3]))
    with pytest.raises(ValueError):
        ProjectionHead(8, 16, 4, num_layers=0)
