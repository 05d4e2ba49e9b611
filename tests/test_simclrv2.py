"""SimCLRv2 (Chen et al. 2020b): SK / wide encoders, fine-tuning from a head layer, distillation."""
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from selfsup.models.backbones import BACKBONES, build_backbone
from selfsup.training.checkpoint import list_checkpoints, load_checkpoint, load_weights
from selfsup.errors import ConfigError
from selfsup.training.config import PretrainConfig
from selfsup.training.config_io import build_config
from selfsup.data.labels import label_subset
from selfsup.data.datasets import load_dataset
from selfsup.protocols.distill import DistillConfig, distill, distill_objective, freeze_teacher
from selfsup.protocols.classifier import Classifier, HeadLayers, classifier_from_pretrain
from selfsup.protocols.label_subsets import prepare_label_subset
from selfsup.models.heads import ProjectionHead
from selfsup.losses import distill_loss
from selfsup.models.sk_resnet import SelectiveKernelConv
from selfsup.protocols.labelled_loop import labeled_stream
from ranks import free_port

# SimCLRv2 Table 1: parameters in millions, "ResNet up to final average pooling layer".
PAPER_PARAMS_M = {
    "resnet50": 24, "resnet50_sk": 35, "resnet50_2x": 94, "resnet50_2x_sk": 140,
    "resnet101": 43, "resnet101_sk": 65, "resnet101_2x": 170, "resnet101_2x_sk": 257,
    "resnet152": 58, "resnet152_sk": 89, "resnet152_2x": 233, "resnet152_2x_sk": 354, "resnet152_3x_sk": 795,
}


# ------------------------------------------------------------------------------------------------
# distill_loss (SimCLRv2 Eq. 2)


@pytest.mark.parametrize("n,c,temperature", [(1, 2, 1.0), (6, 10, 0.1), (9, 3, 2.5)])
def test_distill_loss_matches_hand_computation_kl_and_gradient(n, c, temperature):
    g = torch.Generator().manual_seed(n * 100 + c)
    s = (3 * torch.randn(n, c, generator=g)).requires_grad_()
    t = (3 * torch.randn(n, c, generator=g)).requires_grad_()
    loss = distill_loss(s, t, temperature)

    # By hand: mean over the batch of -sum_y p_T(y) log p_S(y), both softmaxes at temperature T.
    ref = 0.0
    for i in range(n):
        zt = sum(torch.exp(t[i, y].detach() / temperature) for y in range(c))
        zs = sum(torch.exp(s[i, y].detach() / temperature) for y in range(c))
        for y in range(c):
            p = torch.exp(t[i, y].detach() / temperature) / zt
            ref -= p * (s[i, y].detach() / temperature - torch.log(zs))
    ref /= n
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)

    # = KL(teacher || student) + the teacher's entropy (a constant for the student).
    p_t = F.softmax(t.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(s.detach() / temperature, dim=1), p_t, reduction="batchmean")
    entropy = -torch.special.xlogy(p_t, p_t).sum(1).mean()  # 0 log 0 = 0
    torch.testing.assert_close(loss.detach(), kl + entropy, rtol=1e-5, atol=1e-5)

    # Gradients reach only the student: dL/ds = (softmax(s/T) - p_T) / (T n).
    loss.backward()
    assert t.grad is None
    expected = (F.softmax(s.detach() / temperature, dim=1) - p_t) / (temperature * n)
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-6)


def test_distill_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# ------------------------------------------------------------------------------------------------
# Label subsets


def _hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images]


def test_label_subsets_balanced_deterministic_disjoint_from_test_and_reused(tmp_path):
    train, test = load_dataset("embedded", "train"), load_dataset("embedded", "test")
    per_class = torch.bincount(train.labels, minlength=10)
    for fraction in (0.01, 0.1):
        idx = label_subset(train.labels, fraction, seed=3)
        counts = torch.bincount(train.labels[idx], minlength=10)
        assert counts.tolist() == [max(1, round(fraction * int(k))) for k in per_class]
        assert torch.equal(idx, label_subset(train.labels, fraction, seed=3))
        assert not torch.equal(idx, label_subset(train.labels, fraction, seed=4))
    test_hashes = set(_hashes(test.images))
    idx = label_subset(train.labels, 0.1, seed=3)
    subset_hashes = set(_hashes(train.images[idx]))
    assert not subset_hashes & test_hashes

    # The run folder keeps the subset; a later call (another seed) reuses it, another fraction is refused.
    run = tmp_path / "ft"
    first = prepare_label_subset(run, train.labels, "embedded", 0.1, 3, 10)
    stored = json.loads((run / "label_subset.json").read_text())
    assert stored["indices"] == first.tolist() and stored["split"] == "train" and stored["per_class"] == [100] * 10
    assert torch.equal(prepare_label_subset(run, train.labels, "embedded", 0.1, 99, 10), first)
    with pytest.raises(ConfigError, match="fraction"):
        prepare_label_subset(run, train.labels, "embedded", 0.01, 3, 10)

    # Training batches come from the subset only (never from the test split).
    seen = set()
    for images, labels in labeled_stream(train, first, 64, seed=1, start=0, total=20, device=torch.device("cpu")):
        seen.update(_hashes(images))
    assert seen <= subset_hashes and len(seen) > 500


# ------------------------------------------------------------------------------------------------
# Backbones


def _count(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = build_backbone(name)
    return sum(p.numel() for p in model.parameters()), model.num_features


def test_parameter_counts_match_simclrv2_table1():
    assert set(PAPER_PARAMS_M) <= set(BACKBONES)
    for name, paper in PAPER_PARAMS_M.items():
        count, features = _count(name)
        m = count / 1e6
        # Within 2%, or within the table's rounding to whole millions (ResNet-50: 23.5M printed as 24).
        assert abs(m - paper) <= max(0.02 * paper, 0.5), (name, m, paper)
        width = 3 if "_3x" in name else 2 if "_2x" in name else 1
        assert features == 2048 * width


@pytest.mark.parametrize("name,size,channels", [("resnet50_sk", 32, 1), ("resnet101_2x_sk", 72, 3), ("resnet50_3x", 16, 3)])
def test_sk_and_wide_backbones_run_forward_and_backward(name, size, channels):
    torch.manual_seed(0)
    model = build_backbone(name, width=0.0625 if "_sk" in name else 0.03125, in_channels=channels, image_size=size)
    y = model(torch.randn(3, channels, size, size))
    assert y.shape == (3, model.num_features) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    if name.endswith("_sk"):
        sk = [m for m in model.modules() if isinstance(m, SelectiveKernelConv)]
        assert len(sk) == sum(len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4))
        assert sk[0].fc2.weight.grad.abs().sum() > 0  # the mixing weights are trained
        # ResNet-D: deep stem for large images, average-pooled strided shortcuts.
        assert isinstance(model.conv1, torch.nn.Sequential) == (size > 64)
        assert isinstance(model.layer2[0].downsample[0], torch.nn.AvgPool2d)


def test_selective_kernel_mixes_paths_with_softmax_weights():
    torch.manual_seed(0)
    sk = SelectiveKernelConv(4, 6, stride=2, sk_ratio=0.5, min_dim=2).eval()
    for bn in (sk.bn, sk.fc1_bn):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 9, 9)
    u = F.relu(sk.bn(sk.conv(x)))
    u1, u2 = u[:, :6], u[:, 6:]
    s = (u1 + u2).mean(dim=(2, 3), keepdim=True)
    a = sk.fc2(F.relu(sk.fc1_bn(sk.fc1(s))))
    w = torch.stack([a[:, :6], a[:, 6:]]).softmax(0)
    torch.testing.assert_close(sk(x), w[0] * u1 + w[1] * u2)
    assert sk(x).shape == (2, 6, 5, 5)
    assert sk.fc1.out_channels == 3  # max(int(6 * 0.5), 2)
    with pytest.raises(ValueError, match="sk_ratio"):
        build_backbone("resnet50_sk", sk_ratio=0.0)


# ------------------------------------------------------------------------------------------------
# Fine-tuning from head layer K, and distillation


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    from selfsup.training.loop import pretrain

    cfg = build_config(PretrainConfig, {
        "recipe": "cpu", "dataset": "embedded", "backbone": "resnet18", "backbone_width": 0.0625, "batch_size": 16, "steps": 1,
        "knn_monitor": False, "simclr": {"proj_layers": 3, "proj_out_dim": 16, "proj_hidden_dim": 24},
        "channels_last": False})
    run = tmp_path_factory.mktemp("simclrv2") / "pre"
    pretrain(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def finetune_run(pretrain_run):
    from selfsup.cli.app import main

    out = pretrain_run.parent / "ft"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["finetune", "--run", str(pretrain_run), "--label-fraction", "0.01", "--from-head-layer", "1",
                   "--steps", "2", "--batch-size", "32", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_finetune_from_head_layer_k_uses_exactly_the_first_k_layers(pretrain_run):
    weights = load_weights(pretrain_run / "model.safetensors")
    full = ProjectionHead(32, 24, 16, num_layers=3)
    full.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    full.eval()
    h = torch.randn(5, 32)
    for k in range(4):
        model, info = classifier_from_pretrain(pretrain_run, k, num_classes=10)
        assert info["from_head_layer"] == k == model.from_head_layer == len(model.head.layers)
        head_keys = {key.split(".")[2] for key in model.state_dict() if key.startswith("head.")}
        assert head_keys == {str(i) for i in range(k)}
        model.eval()
        torch.testing.assert_close(model.head(h), full(h, return_all=True)[k])
        assert model.fc.in_features == full.layer_dim(k)
    with pytest.raises(ConfigError, match="0..3"):
        classifier_from_pretrain(pretrain_run, 4, num_classes=10)


def test_finetune_cli_trains_backbone_and_first_head_layer(pretrain_run, finetune_run):
    out, result = finetune_run
    assert set(result) >= {"top1", "top5"} and 0 <= result["top1"] <= result["top5"] <= 100
    assert result["num_labeled"] == 100 and result["from_head_layer"] == 1
    assert json.loads((out / "results.json").read_text()) == result
    pre, ft = load_weights(pretrain_run / "model.safetensors"), load_weights(out / "model.safetensors")
    assert {k for k in ft if k.startswith("head.")} == {k for k in pre if k.startswith("head.layers.0.")}
    for key in ("head.layers.0.0.weight", "backbone.conv1.weight"):
        assert not torch.equal(pre[key], ft[key])  # kept and trained
    assert (out / "config.yaml").is_file() and (out / "label_subset.json").is_file()



def test_finetuned_encoder_serves_eval_embed_and_export(finetune_run, tmp_path):
    # The fine-tuned backbone is an encoder like any other: load_run reads it from run.json.
    from safetensors.torch import load_file

    from selfsup.cli.app import main
    from selfsup.training.runs import load_encoder, load_run

    out, _ = finetune_run
    encoder = load_encoder(load_run(out))
    ft = load_weights(out / "model.safetensors")
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, ft["backbone." + k]), k
    assert main(["export", "--run", str(out), "--to", "safetensors", "--out", str(tmp_path / "ft.safetensors")]) == 0
    exported = load_file(tmp_path / "ft.safetensors")
    assert torch.equal(exported["conv1.weight"], ft["backbone.conv1.weight"])


def test_teacher_gets_no_gradient_no_optimizer_state_and_no_ddp(finetune_run, monkeypatch, tmp_path):
    import torch.distributed as tdist
    from torch.nn import parallel

    from selfsup.protocols.classifier import load_classifier

    teacher_dir, _ = finetune_run
    # One distillation step by hand: the frozen teacher gets no gradient and is not in the optimiser.
    teacher, _ = load_classifier(teacher_dir)
    teacher.train()
    teacher = freeze_teacher(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    backbone = build_backbone("resnet18", width=0.03125, in_channels=1, image_size=28)
    student = Classifier(backbone, HeadLayers([], backbone.num_features), 10)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(8, 1, 28, 28)
    loss, logs = distill_objective(student, teacher, x, 1.0, (torch.randn(4, 1, 28, 28), torch.arange(4)), 0.5)
    loss.backward()
    opt.step()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # BN statistics too
    assert {"distill_loss", "agreement", "labeled_ce"} <= set(logs)

    # The real loop, under a (one-process) process group: only the student is wrapped in DDP.
    wrapped = []

    class RecordingDDP(parallel.DistributedDataParallel):
        def __init__(self, module, *args, **kwargs):
            wrapped.append(module)
            super().__init__(module, *args, **kwargs)

    monkeypatch.setattr(parallel, "DistributedDataParallel", RecordingDDP)
    teacher_file = teacher_dir / "model.safetensors"
    digest = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    cfg = DistillConfig(teacher=str(teacher_dir), student="resnet18", student_width=0.03125, steps=2, batch_size=32,
                        labeled_weight=0.5, checkpoint_every=1, device="cpu")
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        result = distill(cfg, tmp_path / "distill", progress=False)
    finally:
        tdist.destroy_process_group()
    assert len(wrapped) == 1 and isinstance(wrapped[0], Classifier) and wrapped[0].backbone.num_features == 16
    assert result["temperature"] == 1.0 and not result["self_distillation"] and 0 <= result["top1"] <= 100
    assert hashlib.sha256(teacher_file.read_bytes()).hexdigest() == digest
    _, state, meta = load_checkpoint(list_checkpoints(tmp_path / "distill")[-1])
    n_student = len(list(wrapped[0].parameters()))
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_student
    assert len(state["optimizer"]["state"]) <= n_student and meta["kind"] == "distill"
    saved = load_weights(tmp_path / "distill" / "model.safetensors")
    assert set(saved) == set(wrapped[0].state_dict())  # the student only


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_finetune_and_distill_resume_equals_uninterrupted(kind, pretrain_run, finetune_run, tmp_path, monkeypatch):
    import selfsup.protocols.labelled_loop as sup
    from selfsup.protocols.finetune import FinetuneConfig, finetune

    def make():
        common = {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 1}
        if kind == "finetune":
            return FinetuneConfig(run=str(pretrain_run), label_fraction=0.01, from_head_layer=1, **common)
        return DistillConfig(teacher=str(finetune_run[0]), student="resnet18", student_width=0.0625, **common)

    run = finetune if kind == "finetune" else distill
    full = run(make(), tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    original = sup.save_state

    def save_then_stop(cfg, spec, run_dir, model, optimizer, step, bad_total):
        original(cfg, spec, run_dir, model, optimizer, step, bad_total)
        if step == 2:
            raise Stop  # killed right after the checkpoint at step 2

    monkeypatch.setattr(sup, "save_state", save_then_stop)
    with pytest.raises(Stop):
        run(make(), tmp_path / "cut", progress=False)
    monkeypatch.setattr(sup, "save_state", original)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000002"]
    resumed = run(make(), tmp_path / "cut", resume=True, progress=False)
    a, b = load_weights(tmp_path / "full" / "model.safetensors"), load_weights(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["top1"] == full["top1"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
