"""The places where ``pretrain`` wires the parts together, checked through the real loop: the two views it hands
the method, the EMA tau it passes, gradient accumulation, the data order of each epoch, and the lr of each step."""
from __future__ import annotations

import copy
import json
import math
from itertools import combinations

import pytest
import torch

from selfsup.training import setup
from selfsup.training.loop import pretrain
from selfsup.training.schedules import scaled_lr
from selfsup.training.batches import StepBatchSampler, batch_stream, step_indices


@pytest.fixture
def spy(monkeypatch):
    """What the loop hands the model it builds: the views of every forward pass, every EMA tau, and at every
    optimiser step the learning rates and gradients; ``initial`` is a copy of the model before its first step."""
    record = {"views": [], "taus": [], "lrs": [], "grads": [], "initial": None}
    real_build, real_optimizer = setup.build_model, setup.build_optimizer

    def build(*a, **kw):
        model = real_build(*a, **kw)
        record["initial"] = copy.deepcopy(model)
        model.register_forward_pre_hook(lambda m, args: record["views"].append((args[0].detach().clone(),
                                                                                args[1].detach().clone())))
        if hasattr(model, "update_target"):
            update = model.update_target
            model.update_target = lambda tau: (record["taus"].append(tau), update(tau))[1]
        return model

    def build_optimizer(name, model, *a, **kw):
        optimizer = real_optimizer(name, model, *a, **kw)
        step = optimizer.step

        def spied_step(*sa, **skw):
            record["lrs"].append([g["lr"] for g in optimizer.param_groups])
            record["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                    if p.grad is not None})
            return step(*sa, **skw)

        optimizer.step = spied_step
        return optimizer

    monkeypatch.setattr(setup, "build_model", build)
    monkeypatch.setattr(setup, "build_optimizer", build_optimizer)
    return record


def _logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Views


def test_the_method_gets_two_different_views_of_every_image(tmp_path, tiny_cfg, spy):
    # SimCLR's two views share one augmentation config: only their random draws tell them apart.
    cfg = tiny_cfg(method="simclr", steps=3, accumulate=2)
    assert cfg.view == cfg.view2 or cfg.view is None
    pretrain(cfg, tmp_path / "r", progress=False)
    assert len(spy["views"]) == 3 * 2  # one forward pass per micro-batch
    for x1, x2 in spy["views"]:
        assert x1.shape == x2.shape and x1.shape[0] == 8
        same = [i for i in range(x1.shape[0]) if torch.equal(x1[i], x2[i])]
        assert not same, f"view 1 and view 2 of images {same} are identical"
    firsts = [x1 for x1, _ in spy["views"]]
    assert not any(torch.equal(a, b) for a, b in combinations(firsts, 2))  # and every step draws anew


# ------------------------------------------------------------------------------------------------
# BYOL's EMA tau


def _tau(step: int, total: int, base: float) -> float:
    """BYOL Sec. 3.2: tau = 1 - (1 - base)(cos(pi k / K) + 1) / 2, written out here rather than imported."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


def test_the_loop_passes_the_scheduled_tau_at_each_step_also_after_a_resume(tmp_path, tiny_cfg, spy):
    cfg = tiny_cfg(method="byol", steps=6, checkpoint_every=3, base_tau=0.9)
    pretrain(cfg, tmp_path / "full", progress=False)
    expected = [_tau(s, 6, 0.9) for s in range(6)]
    assert spy["taus"] == pytest.approx(expected, abs=1e-12)
    assert len(set(spy["taus"])) == 6  # a constant tau would repeat

    class Stop(Exception):
        pass

    def stop(step):
        if step == 4:
            raise Stop

    spy["taus"].clear()
    with pytest.raises(Stop):
        pretrain(cfg, tmp_path / "cut", progress=False, on_step=stop)
    spy["taus"].clear()
    pretrain(cfg, tmp_path / "cut", resume=True, progress=False)  # from the checkpoint at step 3
    assert spy["taus"] == pytest.approx(expected[3:], abs=1e-12)


def test_lightning_passes_the_scheduled_tau_at_each_step(tmp_path):
    L = pytest.importorskip("lightning")
    from selfsup.data.datasets import load_dataset
    from selfsup.lightning import BYOLModule, step_dataloader

    dataset = load_dataset("embedded", "train")
    module = BYOLModule.for_dataset(dataset, backbone="resnet18", backbone_width=0.0625, batch_size=16,
                                    byol={"proj_out_dim": 16, "base_tau": 0.9}, precision="fp32")
    taus, update = [], module.model.update_target
    module.model.update_target = lambda tau: (taus.append(tau), update(tau))[1]
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, step_dataloader(dataset, module.cfg, 4))
    assert taus == pytest.approx([_tau(s, 4, 0.9) for s in range(4)], abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_accumulating_micro_batches_gives_the_loss_and_gradients_of_their_mean(tmp_path, tiny_cfg, spy, method):
    k = 4
    cfg = tiny_cfg(method=method, steps=1, accumulate=k, batch_size=16, precision="fp32")
    pretrain(cfg, tmp_path / "r", progress=False)
    assert len(spy["views"]) == k and len(spy["grads"]) == 1
    reference = spy["initial"]  # the model before the step, fed the loop's own micro-batches one by one
    reference.train()
    losses, grads = [], {}
    for x1, x2 in spy["views"]:
        reference.zero_grad(set_to_none=True)
        loss, _ = reference(x1, x2)
        loss.backward()
        losses.append(loss.item())
        for n, p in reference.named_parameters():
            if p.grad is not None:
                grads[n] = grads.get(n, 0) + p.grad / k
    assert _logged(tmp_path / "r")[0]["loss"] == pytest.approx(sum(losses) / k, rel=1e-5)
    used = spy["grads"][0]
    assert used.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(used[n], g, rtol=1e-4, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------------
# Data order


class _Indexed(torch.utils.data.Dataset):
    """Image i is a 1x1 image of value i: a batch shows which images it holds."""

    def __init__(self, n: int, in_memory: bool):
        if in_memory:
            self.images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([[[i]]], dtype=torch.uint8), 0


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_every_epoch_sees_every_image_once_in_a_new_order(in_memory):
    n, batch, per_epoch, epochs = 64, 16, 4, 4
    stream = batch_stream(_Indexed(n, in_memory), batch, seed=5, start_step=0, total_steps=per_epoch * epochs,
                          num_workers=0, device=torch.device("cpu"))
    seen = torch.cat([b.flatten().long() for b in stream]).view(epochs, n)
    for order in seen:
        assert sorted(order.tolist()) == list(range(n))
    for a, b in combinations(seen, 2):
        assert not torch.equal(a, b)
        assert set(a[:batch].tolist()) != set(b[:batch].tolist())  # not only the same batches in another order
    sampler = StepBatchSampler(n, batch, 5, per_epoch, 2 * per_epoch)  # a resumed run's second epoch
    assert torch.equal(torch.tensor([i for b in sampler for i in b]), seen[1])


def test_ranks_split_each_global_batch():
    n, batch = 64, 16
    for step in (0, 5, 11):
        shares = [step_indices(n, batch, 5, step, rank, 2) for rank in range(2)]
        assert torch.equal(torch.cat(shares), step_indices(n, batch, 5, step))


# ------------------------------------------------------------------------------------------------
# Learning rate


def _lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up reaching ``base`` at step ``warmup - 1``, then cosine to 0 at step ``total``, written out."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup_epochs, warmup", [(1.0, 5), (0.005, 3), (None, 1)],
                         ids=["epochs-capped-at-half", "epochs", "fraction"])
def test_the_loop_uses_the_scheduled_lr_at_each_step(tmp_path, tiny_cfg, spy, warmup_epochs, warmup):
    # embedded: 10,000 images, 625 steps of 16 per epoch. One epoch of warm-up is capped at half of the 10 steps,
    # 0.005 epochs is 3 steps, and without warmup_epochs the warm-up is 10% of the run: 1 step.
    optim = {"warmup_fraction": 0.1, "final_lr_fraction": 0.0}
    if warmup_epochs is not None:
        optim["warmup_epochs"] = warmup_epochs
    cfg = tiny_cfg(steps=10, optim={**optim, "lr": 0.8, "lr_scaling": "linear"})
    pretrain(cfg, tmp_path / "r", progress=False)
    base = 0.8 * 16 / 256
    expected = [_lr(s, 10, warmup, base) for s in range(10)]
    used = spy["lrs"]
    assert all(len(set(groups)) == 1 for groups in used)  # every parameter group at the step's lr
    assert [groups[0] for groups in used] == pytest.approx(expected, rel=1e-12)
    assert [row["lr"] for row in _logged(tmp_path / "r")] == pytest.approx(expected, rel=1e-12)
    assert scaled_lr(0.8, 16, "linear") == base
    assert json.loads((tmp_path / "r" / "run.json").read_text())["warmup_steps"] == warmup
