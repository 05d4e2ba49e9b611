"""The speed work (bf16 autocast, channels_last, torch.compile) must not change what is computed."""
import pytest
import torch

from selfsup.views.augment import BatchAugment
from selfsup.views.config import ViewConfig
from selfsup.models.backbones import build_backbone
from selfsup.models.heads import ProjectionHead
from selfsup.methods import SimCLR


def _model(seed=0):
    torch.manual_seed(seed)
    bb = build_backbone("resnet18", in_channels=3, image_size=16, width=0.125)
    return SimCLR(bb, ProjectionHead(bb.num_features, 32, 16), temperature=0.2).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)


def test_bf16_autocast_loss_close_to_fp32():
    model = _model()
    x1, x2 = _batch()
    with torch.no_grad():
        ref, _ = model(x1, x2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(x1, x2)
    assert low.dtype == torch.float32  # the loss itself is computed in fp32
    assert low.item() == pytest.approx(ref.item(), rel=3e-2)


def test_channels_last_same_loss_and_grads():
    a, b = _model(), _model()
    b = b.to(memory_format=torch.channels_last)
    x1, x2 = _batch()
    la, _ = a(x1, x2)
    lb, _ = b(x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last))
    assert lb.item() == pytest.approx(la.item(), rel=1e-5)
    la.backward()
    lb.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_compiled_model_same_loss():
    model = _model()
    x1, x2 = _batch()
    with torch.no_grad():
        ref, _ = model(x1, x2)
    compiled = torch.compile(model, backend="aot_eager")  # graph capture + AOT autograd, no C++ toolchain needed
    with torch.no_grad():
        out, _ = compiled(x1, x2)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_augmentation_statistics_unchanged_by_autocast_and_layout():
    imgs = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(ViewConfig.simclr(32), 32, (0.5,) * 3, (0.25,) * 3)
    ref = aug(imgs, torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = aug(imgs, torch.Generator().manual_seed(3))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref)
    cl = aug(imgs.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(3))
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
