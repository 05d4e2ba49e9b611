"""Timed runs (--minutes) on a fake clock, and --resume of a run killed before its first checkpoint."""
import json

import pytest
import torch

from selfsup.training import loop as train
from selfsup.training.checkpoint import list_checkpoints, load_weights
from selfsup.training.timed import TimePlan, replan, steps_for
from selfsup.training.loop import pretrain


class FakeClock:
    """Advances ``dt`` seconds at every read; the training loop reads the clock once per step."""

    def __init__(self, dt: float):
        self.t, self.dt = 1000.0, dt

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


def _equal(a, b):
    a, b = load_weights(a), load_weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_replan_is_a_pure_function_of_budget_elapsed_and_pace():
    plan = TimePlan(budget_s=600.0, total_steps=1874, warmup_steps=94)
    # A BYOL case: planned at 296 ms/step, runs at 163 ms/step. At step 200 (32.6 s of steps
    # + 5 s of calibration) the remaining 562.4 s hold 3450 more steps.
    new = replan(plan, 200, 37.6, 0.163)
    assert new == 200 + steps_for(600.0 - 37.6, 0.163) == 3650
    assert replan(TimePlan(600.0, 2000), 1000, 300.0, 0.3) is None  # on pace: no re-plan
    assert replan(TimePlan(600.0, 2000), 1000, 300.0, 0.3 * 1.005) is None  # within 1%
    assert replan(TimePlan(600.0, 2000), 1000, 590.0, 0.3) == 1033  # late: never below step + 1
    with pytest.raises(ValueError):
        steps_for(10, 0)


def test_plan_replays_recorded_events(tmp_path):
    plan = TimePlan(60.0, 100, 5)
    plan.record(30, 150, 5, 0.2)
    plan.record(60, 140, 5, 0.21)
    plan.save(tmp_path)
    again = TimePlan.load(tmp_path)
    assert again == plan
    assert [again.state_at(s) for s in (0, 29, 30, 59, 60, 99)] == [(100, 5), (100, 5), (150, 5), (150, 5), (140, 5), (140, 5)]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_timed_run_ends_within_3_percent_when_the_pace_changes(tmp_path, tiny_cfg, monkeypatch, method):
    # Calibration sees 0.5 s/step; from step 20 the steps take 0.3 s (the BYOL case: faster after warm-up).
    clock = FakeClock(0.5)
    monkeypatch.setattr(train, "_clock", clock)

    def speed_up(step):
        if step == 20:
            clock.dt = 0.3

    pretrain(tiny_cfg(method=method, steps=None, minutes=1.0, checkpoint_every=1000, log_every=50), tmp_path / "r",
             progress=False, on_step=speed_up)
    used = json.loads((tmp_path / "r" / "train_summary.json").read_text())["budget_seconds_used"]
    assert abs(used - 60.0) <= 0.03 * 60.0, used
    plan = TimePlan.load(tmp_path / "r")
    assert plan.events, "the pace changed, so the run re-planned"
    steps = json.loads((tmp_path / "r" / "train_summary.json").read_text())["steps"]
    assert steps == plan.state_at(steps)[0]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["total_steps"] == steps


def test_timed_run_ends_on_time_when_the_pace_changes_in_its_last_interval(tmp_path, tiny_cfg, monkeypatch):
    # The machine gets busier 8 steps before the planned end (0.5 -> 0.9 s/step): with checks only every
    # tenth of the run, the run would end ~3 s (5%) late; the last interval is checked more often.
    clock = FakeClock(0.5)
    monkeypatch.setattr(train, "_clock", clock)

    def slow_down(step):
        if step == TimePlan.load(tmp_path / "r").total_steps - 8:
            clock.dt = 0.9

    pretrain(tiny_cfg(steps=None, minutes=1.0, checkpoint_every=1000, log_every=50), tmp_path / "r",
             progress=False, on_step=slow_down)
    used = json.loads((tmp_path / "r" / "train_summary.json").read_text())["budget_seconds_used"]
    assert clock.dt == 0.9 and abs(used - 60.0) <= 0.03 * 60.0, used


def test_timed_run_without_drift_equals_a_fixed_step_run(tmp_path, tiny_cfg, monkeypatch):
    # Steady 0.25 s steps: the loop's one set-up read of the clock (0.25 s) is within the 1% tolerance of 30 s.
    monkeypatch.setattr(train, "_clock", FakeClock(0.25))
    timed = pretrain(tiny_cfg(steps=None, minutes=0.5, checkpoint_every=1000, log_every=50), tmp_path / "timed",
                     progress=False)
    assert not TimePlan.load(tmp_path / "timed").events
    total = json.loads((tmp_path / "timed" / "run.json").read_text())["total_steps"]
    fixed = pretrain(tiny_cfg(steps=total, checkpoint_every=1000, log_every=50), tmp_path / "fixed", progress=False)
    _equal(timed, fixed)


@pytest.mark.precision
def test_resumed_timed_run_follows_the_recorded_plan(tmp_path, tiny_cfg, monkeypatch):
    def run(out, **kw):
        clock = FakeClock(0.5)
        monkeypatch.setattr(train, "_clock", clock)

        def hook(step):
            if step == 20:
                clock.dt = 0.3
            if kw.get("kill_at") == step:
                raise KeyboardInterrupt

        cfg = tiny_cfg(steps=None, minutes=1.0, checkpoint_every=1000, log_every=50)
        return pretrain(cfg, out, progress=False, on_step=hook, resume=kw.get("resume", False))

    full = run(tmp_path / "full")
    first = TimePlan.load(tmp_path / "full").events[0]["step"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", kill_at=first + 5)  # after the re-plan's checkpoint
    assert list_checkpoints(tmp_path / "cut")
    monkeypatch.setattr(train, "_clock", FakeClock(2.0))  # a much slower machine: the plan still rules
    resumed = pretrain(tiny_cfg(steps=None, minutes=1.0, checkpoint_every=1000, log_every=50), tmp_path / "cut",
                       resume=True, progress=False)
    _equal(full, resumed)


@pytest.mark.precision
def test_resume_before_the_first_checkpoint_starts_from_step_0(tmp_path, tiny_cfg, capsys):
    cfg = tiny_cfg(checkpoint_every=1000)
    full = pretrain(cfg, tmp_path / "full", progress=False)

    def bomb(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "cut", progress=False, on_step=bomb)
    assert not list_checkpoints(tmp_path / "cut")
    resumed = pretrain(cfg, tmp_path / "cut", resume=True, progress=False)
    assert "no checkpoint was written yet; starting from step 0" in capsys.readouterr().err
    _equal(full, resumed)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_resume_before_the_first_checkpoint(tmp_path):
    from selfsup.cli.app import main

    args = ["pretrain", "--dataset", "embedded", "--backbone", "resnet10_narrow", "--batch-size", "16", "--steps", "2",
            "--out", str(tmp_path / "r"), "--no-progress", "--set", "knn_monitor=false", "--set", "simclr.proj_out_dim=8"]
    assert main(args) == 0
    (tmp_path / "r" / "model.safetensors").unlink()
    for p in list_checkpoints(tmp_path / "r"):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    assert main(["pretrain", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_replan_counts_the_evaluations_the_new_total_implies():
    from selfsup.training.timed import evaluations_after

    assert evaluations_after(10, 100, 39) == 3  # at 39, 78 and the end (100)
    assert evaluations_after(90, 100, 39) == 1 and evaluations_after(0, 78, 39) == 2
    plan = TimePlan(60.0, 100)
    # 2 s per evaluation, 0.5 s per step, 30 s left at step 40 of 100 (per epoch of 39): the 60 steps and
    # 2 evaluations need 34 s, so the total shrinks until steps + evaluations fit: 40 + 52 = 92 (52 x 0.5 +
    # 2 x 2 = 30 s).
    new = replan(plan, 40, 30.0, 0.5, lambda total: 2.0 * evaluations_after(40, total, 39), total_steps=100)
    assert new == 92
    assert replan(plan, 40, 30.0, 0.5, lambda total: 2.0 * evaluations_after(40, total, 39), total_steps=92) is None


def test_budget_counts_from_the_start_of_pretrain(tmp_path, tiny_cfg, monkeypatch):
    # Loading the data takes 6 s of a 60 s budget (a big folder, a busy machine): the run must still end
    # within 3% of 60 s after pretrain() was called, not 60 s after the calibration began.
    clock = FakeClock(0.5)
    monkeypatch.setattr(train, "_clock", clock)
    load = train.load_training_data

    def slow_load(run):
        clock.t += 6.0
        return load(run)

    monkeypatch.setattr(train, "load_training_data", slow_load)
    start = clock.t
    pretrain(tiny_cfg(steps=None, minutes=1.0, checkpoint_every=1000, log_every=50), tmp_path / "r", progress=False)
    used = json.loads((tmp_path / "r" / "train_summary.json").read_text())["budget_seconds_used"]
    assert abs(used - 60.0) <= 0.03 * 60.0, used
    # The budget covers the whole call: only the last reads (closing the trackers) fall outside it.
    assert (clock.t - start) - used <= 1.0, (clock.t - start, used)


def test_knn_cost_is_measured_by_embedding_a_sample(monkeypatch):
    from selfsup.training import monitors as knn_monitor

    clock = FakeClock(0.0)
    embedded = []

    def fake_extract(enc, dataset, device, image_size, indices, precision):  # 1 ms an image
        clock.t += 0.001 * len(indices)
        embedded.append(len(indices))
        return torch.zeros(len(indices), 4), torch.zeros(len(indices), dtype=torch.long)

    monkeypatch.setattr(knn_monitor, "extract_features_sharded", fake_extract)
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(2, 2)
    model.eval()
    dataset = list(range(30000))
    cost = knn_monitor.measure_knn_cost(model, dataset, "cpu", 28, "fp32", clock, sample=512)
    assert embedded[-1] == 512
    assert cost == pytest.approx(0.001 * (10000 + 2000))  # the bank and the queries, not the warm-up
    assert model.training
    assert knn_monitor.knn_images(list(range(300))) == 600


def test_a_reserve_in_steps_ends_the_run_that_many_steps_early_at_the_measured_pace(tmp_path, tiny_cfg, monkeypatch):
    # The demo's budget holds its evaluations too: a reserve of R steps leaves R x pace seconds free,
    # whatever the pace, also after a re-plan (here the pace changes at step 20).
    clock = FakeClock(0.5)
    monkeypatch.setattr(train, "_clock", clock)

    def slow_down(step):
        if step == 20:
            clock.dt = 0.6

    cfg = tiny_cfg(steps=None, minutes=1.0, minutes_reserve_steps=30, checkpoint_every=1000, log_every=50,
                   knn_monitor=False)
    pretrain(cfg, tmp_path / "r", progress=False, on_step=slow_down)
    used = json.loads((tmp_path / "r" / "train_summary.json").read_text())["budget_seconds_used"]
    assert abs(used - (60.0 - 30 * 0.6)) <= 0.03 * 60.0, used
