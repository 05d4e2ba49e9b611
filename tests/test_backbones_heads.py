import pytest
import torch

from selfsup.models.backbones import BACKBONES, CPU_DEFAULT_BACKBONE, build_backbone
from selfsup.models.heads import ProjectionHead

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


# --- the tiny-map fast paths of backbones.Conv2d --------------------------------------------------

@pytest.mark.parametrize("kernel,size,bias,channels_last", [
    (3, 2, False, True), (3, 2, True, False), (1, 2, False, True), (1, 1, True, False), (1, 2, True, True),
    (3, 4, False, True),  # not a tiny map: the plain convolution
])
def test_tiny_map_conv_equals_conv2d_values_and_gradients(kernel, size, bias, channels_last):
    from selfsup.models.resnet import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(6, 5, kernel, 1, kernel // 2, bias=bias).double()
    x = torch.randn(7, 6, size, size, dtype=torch.double)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = conv.train()(x)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=kernel // 2)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or size == 1
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, conv.weight] + ([conv.bias] if bias else []), g)
    want = torch.autograd.grad(ref, [x, conv.weight] + ([conv.bias] if bias else []), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_default_encoder_same_with_and_without_tiny_map_paths(monkeypatch):
    import selfsup.models.backbones as bb
    import selfsup.models.resnet as resnet  # home of _plain_graph

    torch.manual_seed(0)
    net = bb.build_backbone("resnet18_narrow", in_channels=1, image_size=28).to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    start = {k: v.clone() for k, v in net.state_dict().items()}

    def run():
        net.load_state_dict(start)  # the same batch-norm statistics for both runs
        with torch.no_grad():
            evaluated = net.eval()(x)
        net.train().zero_grad()
        out = net(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()], evaluated

    fast_out, fast_grads, fast_eval = run()
    monkeypatch.setattr(resnet, "_plain_graph", lambda: True)
    plain_out, plain_grads, plain_eval = run()
    torch.testing.assert_close(fast_out, plain_out, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads):  # fp32 summation order differs: compare at the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
    assert torch.equal(fast_eval, plain_eval)  # evaluation never takes the fast paths
