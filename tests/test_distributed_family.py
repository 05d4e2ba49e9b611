"""The family's losses on two gloo processes equal one process on the concatenated batch.

For each loss, 2 ranks x batch B against one process x batch 2B: the mean over ranks of the ranks'
losses is the one-process loss, and the gradient a rank gets for its own rows, divided by W (DDP's
mean over ranks), is the one-process gradient for those rows. The centre and queue updates give every
rank the one-process result. One spawn of two processes for everything (process start-up is the slow
part); the harness follows tests/test_distributed.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from selfsup import distributed as dist
from selfsup.losses import (barlow_twins_loss, dino_center_update, dino_loss, enqueue_keys, infonce_loss,
                            vicreg_loss)
from selfsup.methods.barlow_twins import barlow_twins_multicrop_loss
from selfsup.methods.vicreg import vicreg_multicrop_loss
from ranks import free_port, torchrun_env

WORLD = 2
B = 4  # per-rank batch
UNEVEN = (3, 5)  # per-rank batches for the losses that allow ranks to differ
D = 6


def _inputs() -> dict:
    """The global batch, identical in every process."""
    g = torch.Generator().manual_seed(7)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    spread = torch.linspace(0.3, 2.0, D, dtype=torch.float64)  # VICReg's hinge active in some dimensions only
    z1 = randn(WORLD * B, D) * spread + 0.5
    n_uneven = sum(UNEVEN)
    u1 = randn(n_uneven, D) * spread
    return {"z1": z1, "z2": 0.6 * z1 + randn(WORLD * B, D) * spread, "queue": randn(10, D),
            "u1": u1, "u2": 0.6 * u1 + randn(n_uneven, D),
            "student": [randn(WORLD * B, 5) for _ in range(4)],
            "teacher": [0.3 * randn(WORLD * B, 5) for _ in range(2)],
            "teacher_uneven": [randn(n_uneven, 5) for _ in range(2)], "center": 0.1 * randn(1, 5),
            "local": [0.5 * z1 + randn(WORLD * B, D) * spread for _ in range(2)]}


# name -> loss of (view-1 rows, view-2 rows, inputs); view 2 of InfoNCE is the keys (no gradient).
PAIR_LOSSES = {
    "barlow_twins": lambda a, b, data: barlow_twins_loss(a, b, 0.1),
    "vicreg": lambda a, b, data: vicreg_loss(a, b),
    "infonce": lambda a, b, data: infonce_loss(a, b, 0.3),
    "infonce_queue": lambda a, b, data: infonce_loss(a, b, 0.3, queue=data["queue"]),
}


# name -> multi-crop loss of (global view 1 rows, global view 2 rows, local crops' rows): the methods' own mean
# over (global, global) and (local, global) pairs.
MULTICROP_LOSSES = {
    "barlow_twins_multicrop": lambda a, b, local: barlow_twins_multicrop_loss(a, b, local, 0.1),
    "vicreg_multicrop": lambda a, b, local: vicreg_multicrop_loss(a, b, local),
}


def _multicrop(fn, z1, z2, local):
    inputs = [z.clone().requires_grad_() for z in (z1, z2, *local)]
    loss = fn(inputs[0], inputs[1], inputs[2:])
    loss.backward()
    return loss.detach(), [z.grad for z in inputs]


def _pair(fn, z1, z2, data):
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fn(a, b, data)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def _dino(student, teacher, center):
    student = [s.clone().requires_grad_() for s in student]
    loss = dino_loss(student, teacher, center)
    loss.backward()
    return loss.detach(), [s.grad for s in student]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torchrun_env(rank, WORLD, port)
    assert dist.init_from_env()
    data = _inputs()
    mine = slice(rank * B, (rank + 1) * B)
    out: dict[str, object] = {name: _pair(fn, data["z1"][mine], data["z2"][mine], data)
                              for name, fn in PAIR_LOSSES.items()}
    for name, fn in MULTICROP_LOSSES.items():
        out[name] = _multicrop(fn, data["z1"][mine], data["z2"][mine], [z[mine] for z in data["local"]])
    teacher = [t[mine] for t in data["teacher"]]
    out["dino"] = _dino([s[mine] for s in data["student"]], teacher, data["center"])
    out["center"] = dino_center_update(data["center"], teacher)
    out["queue"] = enqueue_keys(data["queue"], data["z2"][mine])
    start = sum(UNEVEN[:rank])
    rows = slice(start, start + UNEVEN[rank])
    out["barlow_twins_uneven"] = _pair(PAIR_LOSSES["barlow_twins"], data["u1"][rows], data["u2"][rows], data)
    out["center_uneven"] = dino_center_update(data["center"], [t[rows] for t in data["teacher_uneven"]])
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("family_two_ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _rows(r: int) -> slice:
    return slice(r * B, (r + 1) * B)


def _assert_grad(rank_grad, ref_grad):
    # Before DDP's mean over ranks a rank's rows carry W times the global loss's gradient.
    torch.testing.assert_close(rank_grad / WORLD, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_loss_over_ranks_equals_one_process_on_the_global_batch(ranks, name):
    data = _inputs()
    ref, g1, g2 = _pair(PAIR_LOSSES[name], data["z1"], data["z2"], data)
    mean = sum(res[name][0] for res in ranks) / WORLD
    assert mean.item() == pytest.approx(ref.item(), rel=1e-6)
    for r, res in enumerate(ranks):
        _assert_grad(res[name][1], g1[_rows(r)])
        if name.startswith("infonce"):
            assert res[name][2] is None and g2 is None  # the keys are constants
        else:
            _assert_grad(res[name][2], g2[_rows(r)])
    if name == "barlow_twins":  # every rank returns the global loss itself
        assert all(res[name][0].item() == pytest.approx(ref.item(), rel=1e-6) for res in ranks)


@pytest.mark.parametrize("name", list(MULTICROP_LOSSES))
def test_multicrop_loss_over_ranks_equals_one_process_on_the_global_batch(ranks, name):
    """The local-crop terms standardise / regularise over the global batch, as the two-view term does."""
    data = _inputs()
    ref, grads = _multicrop(MULTICROP_LOSSES[name], data["z1"], data["z2"], data["local"])
    assert (sum(res[name][0] for res in ranks) / WORLD).item() == pytest.approx(ref.item(), rel=1e-6)
    for r, res in enumerate(ranks):
        for rank_grad, ref_grad in zip(res[name][1], grads):
            _assert_grad(rank_grad, ref_grad[_rows(r)])


def test_barlow_twins_with_different_batch_sizes_per_rank(ranks):
    data = _inputs()
    ref, g1, g2 = _pair(PAIR_LOSSES["barlow_twins"], data["u1"], data["u2"], data)
    start = 0
    for r, res in enumerate(ranks):
        loss, r1, r2 = res["barlow_twins_uneven"]
        rows = slice(start, start + UNEVEN[r])
        start += UNEVEN[r]
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        _assert_grad(r1, g1[rows])
        _assert_grad(r2, g2[rows])


def test_dino_loss_over_ranks_equals_one_process(ranks):
    data = _inputs()
    ref, grads = _dino(data["student"], data["teacher"], data["center"])
    assert (sum(res["dino"][0] for res in ranks) / WORLD).item() == pytest.approx(ref.item(), rel=1e-6)
    for r, res in enumerate(ranks):
        for rank_grad, ref_grad in zip(res["dino"][1], grads):
            _assert_grad(rank_grad, ref_grad[_rows(r)])


def test_dino_centre_and_moco_queue_updates_use_every_ranks_rows(ranks):
    data = _inputs()
    centre = dino_center_update(data["center"], data["teacher"])
    centre_uneven = dino_center_update(data["center"], data["teacher_uneven"])
    queue = enqueue_keys(data["queue"], data["z2"])
    for res in ranks:
        torch.testing.assert_close(res["center"], centre, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res["center_uneven"], centre_uneven, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res["queue"], queue)
