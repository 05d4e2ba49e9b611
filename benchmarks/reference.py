"""The reference grid: every method's linear-probe and kNN accuracy at 1,000, 5,000 and 20,000 steps, with seeds,
beside the baselines and the supervised ceiling, and the claims the papers make, each checked on seeds.

Rows (``ROWS``): SimCLR, SimCLRv2 (3-layer head), BYOL, and the same encoder trained with labels for the same
steps (``--method supervised``, the ceiling); baselines: the raw pixels and the untrained encoder (the run's
network at step 0, three init seeds). Columns (``COLUMNS``): 1,000 and 5,000 steps of batch 256 with seeds 0,
1, 2, and 20,000 steps with seed 0, on full Fashion-MNIST; each cell is probed with ``selfsup eval linear``
and ``selfsup eval knn``. Claims (``build_plan``), three seeds each:

  (a) BYOL against SimCLR at the longest budget (BYOL Table 1).
  (b) Batch 256 against 64 at equal images seen, for SimCLR and BYOL: BYOL's relative drop is the smaller
      (BYOL Table 16).
  (c) BYOL without its predictor and with a fixed target (tau = 1) against BYOL, with the collapse monitor's
      verdict read from each run (BYOL Table 5).
  (d) SimCLRv2 semi-supervised: fine-tuning from the head's first layer against layer 0 at 1% labels; a
      distilled student (same size, and half width) against the same student trained on the labels alone
      at 1% and 10%; a 2x wider encoder's gain at 1% labels against its gain at 100% (SimCLRv2 Sec. 2-4).

A claim holds here when the seed spread separates it: mean - sd of the larger side above mean + sd of the
other (the rule of docs/results.md); the tables give mean, sample sd, the difference and the difference in
pooled sds.

Each cell is one run folder under ``--root`` made by the ``selfsup`` commands a user would type
(``benchmarks/cells.py``): pre-training (``--resume`` from its newest checkpoint when interrupted), then the
evaluations, whose JSONs and the cell's record (``cell.json``) are saved in the folder. A rerun of the same
command skips finished cells and continues unfinished ones. Cells run in worker processes of one thread each
(``OMP_NUM_THREADS=1``, torch threads 1), ``--jobs K`` of them side by side; ``--device cuda`` runs every
command on the GPU. ``ROOT/results.json`` collects every finished cell (config summary, steps, seed, linear,
kNN, wall time, machine); ``--report`` writes the results page's tables and plots from that JSON alone.

    python benchmarks/reference.py --list                                  # the cells and their state
    python benchmarks/reference.py --jobs 2                                # everything, on the CPU
    python benchmarks/reference.py --device cuda --jobs 8                  # everything, on one GPU
    python benchmarks/reference.py --rows simclr,byol --steps 1000 --seeds 0 --groups grid   # a subset
    python benchmarks/reference.py --steps-scale 0.01 --root runs/reference_smoke             # a smoke grid
    python benchmarks/reference.py --row moco moco moco.temperature=0.2    # one more row (method + --set)
    python benchmarks/reference.py --report                                # docs/results/grid.md + plots

Layout of ``--root``: ``CELL/`` (the run folder and ``cell.json``), ``logs/CELL.log`` (the commands' output),
``logs/CELL.json`` (the cell's settings and the sessions that worked on it), ``results.json``.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cells  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Config keys this script sets with `--set` (pre-training and fine-tuning configs). Method keys are moving into
# sections of the config (`base_tau` -> `byol.base_tau`, ...): a rename is one edit here.
KEYS = {
    "predictor": "byol.predictor",       # BYOL: the online predictor on/off (BYOL Table 5b)
    "base_tau": "byol.base_tau",         # BYOL: base EMA rate of the target; 1 = the target stays at its init (Table 5a)
    "backbone": "backbone",              # encoder name, read from the grid's --set to build the label-only students
    "backbone_width": "backbone_width",  # width multiplier: SimCLRv2's wider encoder, the half-width students
    "knn_monitor": "knn_monitor",        # kNN monitor during pre-training: off (every cell is evaluated afterwards)
    "device": "device",                  # pre-training's device (`selfsup pretrain` has no --device flag)
}


@dataclass(frozen=True)
class Row:
    """A row of the grid: a name, a registered method, and `--set KEY=VALUE` overrides of its pre-training."""

    name: str
    method: str
    sets: tuple[str, ...] = ()
    about: str = ""


ROWS = (
    Row("simclr", "simclr", about="SimCLR (Chen et al. 2020)"),
    Row("simclrv2", "simclrv2", about="SimCLRv2: SimCLR with the 3-layer projection head (Chen et al. 2020b)"),
    Row("byol", "byol", about="BYOL (Grill et al. 2020)"),
    Row("supervised", "supervised", about="the same encoder trained with labels for the same steps: the ceiling"),
)
# Rows that join the grid once the installed selfsup registers their method (`selfsup.methods.METHODS`).
NEW_METHOD_ROWS = (
    Row("moco", "moco", about="MoCo v3 (Chen, Xie, He 2021)"),
    Row("simsiam", "simsiam", about="SimSiam (Chen, He 2021)"),
    Row("barlow_twins", "barlow_twins", about="Barlow Twins (Zbontar et al. 2021)"),
    Row("vicreg", "vicreg", about="VICReg (Bardes, Ponce, LeCun 2022)"),
    Row("dino", "dino", about="DINO (Caron et al. 2021)"),
)
# Rows of the claims only.
BYOL_NO_PREDICTOR = Row("byol_no_predictor", "byol", (f"{KEYS['predictor']}=false",), "BYOL without the predictor")
BYOL_FIXED_TARGET = Row("byol_fixed_target", "byol", (f"{KEYS['base_tau']}=1",), "BYOL with a fixed target (tau = 1)")

BATCH = 256                                             # the grid's batch (--batch-size)
COLUMNS = {1000: (0, 1, 2), 5000: (0, 1, 2), 20000: (0,)}  # steps of batch BATCH -> seeds
RANDOM_INIT_SEEDS = (0, 1, 2)                           # the untrained encoder's init seeds
CLAIM_SEEDS = (0, 1, 2)
LONGEST = max(COLUMNS)                                  # claim (a)
CLAIM_BUDGET = 5000                                     # claims (b), (c), (d): steps of batch BATCH
SMALL_BATCH_DIVISOR = 4                                 # claim (b): 256 against 64, at 4x the steps
FINETUNE_EPOCHS = {0.01: 60.0, 0.1: 30.0, 1.0: 30.0}    # SimCLRv2 Sec. 4 (`selfsup finetune`'s paper epochs)
DISTILL_EPOCHS = 10.0                                   # `selfsup distill`'s default (the paper: 400 on ImageNet)
DEFAULT_BACKBONE_WIDTH = 0.25                           # resnet18_narrow's width (the CPU default encoder)
BIG_WIDTH, SMALL_WIDTH = 2.0, 0.5                       # claim (d): the wider encoder, the smaller student
CHECKPOINTS_PER_RUN, MAX_CHECKPOINT_EVERY = 4, 500      # a pre-training run saves every min(500, steps / 4)
GRID_FLAGS = {"method": "--row", "steps": "--steps-scale", "epochs": "--steps-scale", "minutes": "--steps-scale",
              "seed": "--seeds", "batch_size": "--batch-size", KEYS["device"]: "--device"}

RUN_ARGS = ("--no-progress", "--logger", "none")


# ------------------------------------------------------------------------------------------------
# The plan: cells and claims


@dataclass
class Cell:
    """One run folder of the grid. ``argv`` is the command that makes it (its identity: a rerun with other
    settings is refused); ``free`` holds bookkeeping flags that may change between sessions (device, paths)."""

    id: str
    kind: str  # pretrain | random | pixels | finetune | distill
    row: str
    method: str | None
    budget: int  # the column: steps of batch BATCH before --steps-scale (0: no pre-training)
    seed: int
    steps: int | None  # pre-training steps
    batch_size: int | None
    argv: list
    free: list
    resume: list = field(default_factory=list)
    deps: tuple = ()
    groups: set = field(default_factory=set)
    info: dict = field(default_factory=dict)

    @property
    def spec(self) -> dict:
        return {"kind": self.kind, "argv": [str(a) for a in self.argv], "steps": self.steps}

    def record(self) -> dict:
        return {"id": self.id, "kind": self.kind, "row": self.row, "method": self.method, "budget": self.budget,
                "seed": self.seed, "steps": self.steps, "batch_size": self.batch_size, "groups": sorted(self.groups),
                **self.info}


@dataclass
class Grid:
    root: Path
    dataset: str
    data_dir: str | None
    device: str
    scale: float
    batch: int
    sets: tuple[str, ...]
    rows: tuple[Row, ...]
    checkpoint_every: int | None


def parse_sets(sets) -> dict[str, str]:
    out = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"reference: --set {s!r}: expected KEY=VALUE, e.g. --set optim.lr=0.5")
        out[key.strip()] = value.strip()
    return out


class Plan:
    """Every cell of the grid and the claims, and how each claim reads its cells."""

    def __init__(self, g: Grid):
        self.g = g
        self.cells: dict[str, Cell] = {}
        self.claims: list[dict] = []
        given = parse_sets(g.sets)
        self.base_width = float(given.get(KEYS["backbone_width"], DEFAULT_BACKBONE_WIDTH))
        self.backbone = given.get(KEYS["backbone"])
        if self.backbone is not None and KEYS["backbone_width"] not in given:
            raise SystemExit(f"reference: --set {KEYS['backbone']}={self.backbone} needs its width too (claim (d) widens "
                             f"and halves it): add --set {KEYS['backbone_width']}=W")

    # --- cells
    def _add(self, cell: Cell, group: str) -> str:
        have = self.cells.setdefault(cell.id, cell)
        if have.spec != cell.spec:
            raise AssertionError(f"two cells named {cell.id} with different commands")
        have.groups.add(group)
        return cell.id

    def data_args(self) -> list:
        return ["--data-dir", self.g.data_dir] if self.g.data_dir else []

    def steps_of(self, budget: int, batch: int) -> int:
        """Pre-training steps of a column: ``budget`` steps of the grid's batch, times --steps-scale, at ``batch``
        (a smaller batch trains proportionally more steps: the same images seen)."""
        return max(1, round(budget * self.g.scale)) * (self.g.batch // batch)

    def steps_label(self, batch: int | None = None) -> str:
        return f"{self.steps_of(CLAIM_BUDGET, batch or self.g.batch):,} steps"

    def _pretrain_free(self, steps: int) -> tuple[list, list]:
        every = self.g.checkpoint_every or max(1, min(MAX_CHECKPOINT_EVERY, steps // CHECKPOINTS_PER_RUN))
        device = ["--set", f"{KEYS['device']}={self.g.device}"]
        return [*RUN_ARGS, "--checkpoint-every", every, *device, *self.data_args()], [*RUN_ARGS, *device]

    def pretrain(self, row: Row, budget: int, seed: int, group: str, batch: int | None = None) -> str:
        batch = batch or self.g.batch
        steps = self.steps_of(budget, batch)
        argv = ["pretrain", "--method", row.method, "--dataset", self.g.dataset, "--steps", steps, "--batch-size", batch,
                "--seed", seed, "--set", f"{KEYS['knn_monitor']}=false"]
        for s in (*self.g.sets, *row.sets):  # the grid's --set, then the row's (the row's win)
            argv += ["--set", s]
        free, resume = self._pretrain_free(steps)
        return self._add(Cell(f"{row.name}_b{batch}_{steps}_s{seed}", "pretrain", row.name, row.method, budget, seed,
                              steps, batch, argv, free, resume, info={"sets": list(row.sets), "about": row.about}), group)

    def random_init(self, seed: int) -> str:
        """The untrained encoder: a 1-step run records the grid's encoder config with this seed, and
        ``selfsup eval --baseline random-init --run`` rebuilds that network as drawn at step 0."""
        argv = ["pretrain", "--method", ROWS[0].method, "--dataset", self.g.dataset, "--steps", 1, "--batch-size",
                self.g.batch, "--seed", seed, "--set", f"{KEYS['knn_monitor']}=false"]
        for s in self.g.sets:
            argv += ["--set", s]
        free, resume = self._pretrain_free(1)
        return self._add(Cell(f"random_s{seed}", "random", "random", None, 0, seed, 1, None, argv, free, resume,
                              info={"about": "the untrained encoder (step 0)"}), "grid")

    def pixels(self) -> str:
        return self._add(Cell("pixels", "pixels", "pixels", None, 0, 0, None, None,
                              ["--baseline", "pixels", "--dataset", self.g.dataset],
                              ["--device", self.g.device, *self.data_args()],
                              info={"about": "raw pixels"}), "grid")

    def _labelled_free(self) -> tuple[list, list]:
        device = ["--device", self.g.device]
        return ["--no-progress", *device, *self.data_args()], ["--no-progress", *device]

    def finetune(self, pre: str, layer: int, fraction: float, group: str) -> str:
        base = self.cells[pre]
        epochs = FINETUNE_EPOCHS[fraction] * self.g.scale
        argv = ["finetune", "--run", pre, "--label-fraction", fraction, "--from-head-layer", layer,
                "--epochs", f"{epochs:g}", "--seed", base.seed]
        free, resume = self._labelled_free()
        return self._add(Cell(f"ft_{pre}_k{layer}_f{100 * fraction:g}", "finetune", base.row, base.method, base.budget,
                              base.seed, None, None, argv, free, resume, deps=(pre,),
                              info={"label_fraction": fraction, "from_head_layer": layer, "pretrain": pre}), group)

    def scratch(self, width: float, fraction: float, seed: int, budget: int, group: str) -> str:
        """The student trained on the labelled subset alone (``selfsup finetune`` without ``--run``)."""
        epochs = FINETUNE_EPOCHS[fraction] * self.g.scale
        argv = ["finetune", "--dataset", self.g.dataset, "--label-fraction", fraction, "--epochs", f"{epochs:g}",
                "--seed", seed]
        if self.backbone is not None:
            argv += ["--backbone", self.backbone]
        argv += ["--set", f"{KEYS['backbone_width']}={width:g}"]
        free, resume = self._labelled_free()
        return self._add(Cell(f"scratch_w{width:g}_f{100 * fraction:g}_e{epochs:g}_s{seed}", "finetune", "scratch", None,
                              budget, seed, None, None, argv, free, resume,
                              info={"label_fraction": fraction, "width": width}), group)

    def distill(self, teacher: str, width: float | None, group: str) -> str:
        """A student distilled from ``teacher``: its own architecture (``width`` None) or ``width``, from scratch."""
        t = self.cells[teacher]
        epochs = DISTILL_EPOCHS * self.g.scale
        argv = ["distill", "--teacher", teacher, "--epochs", f"{epochs:g}", "--seed", t.seed]
        if width is not None:
            argv += ["--student-width", f"{width:g}"]
        free, resume = self._labelled_free()
        tag = "same" if width is None else f"w{width:g}"
        return self._add(Cell(f"distill_{teacher}_{tag}_e{epochs:g}", "distill", t.row, t.method, t.budget, t.seed,
                              None, None, argv, free, resume, deps=(teacher,),
                              info={"label_fraction": t.info["label_fraction"], "teacher": teacher,
                                    "width": width if width is not None else self.base_width}), group)

    # --- the grid and the claims
    def build(self) -> "Plan":
        self.pixels()
        for s in RANDOM_INIT_SEEDS:
            self.random_init(s)
        for budget, seeds in COLUMNS.items():
            for s in seeds:
                for row in self.g.rows:
                    self.pretrain(row, budget, s, "grid")
        self.claim_a()
        self.claim_b()
        self.claim_c()
        self.claim_d()
        return self

    def claim_a(self) -> None:
        byol, simclr = ({s: self.pretrain(r, LONGEST, s, "a") for s in CLAIM_SEEDS} for r in (ROWS[2], ROWS[0]))
        self.claims.append({
            "id": "a", "title": f"BYOL against SimCLR at {self.steps_of(LONGEST, self.g.batch):,} steps",
            "paper": "BYOL Table 1 (ImageNet, ResNet-50, linear evaluation): BYOL 74.3, SimCLR 69.3.",
            "comparisons": [
                compare(f"{name}: BYOL above SimCLR", "BYOL", values(byol, metric), "SimCLR", values(simclr, metric))
                for name, metric in (("linear top-1 %", "linear"), ("kNN top-1 %", "knn"))],
        })

    def claim_b(self) -> None:
        small = self.g.batch // SMALL_BATCH_DIVISOR
        runs = {m: {b: {s: self.pretrain(r, CLAIM_BUDGET, s, "b", b) for s in CLAIM_SEEDS} for b in (self.g.batch, small)}
                for m, r in (("SimCLR", ROWS[0]), ("BYOL", ROWS[2]))}
        drop = {m: {s: ["drop", runs[m][self.g.batch][s], runs[m][small][s], "linear"] for s in CLAIM_SEEDS} for m in runs}
        self.claims.append({
            "id": "b", "title": f"batch {self.g.batch} against {small} at equal images seen ({self.steps_label()} "
                                f"against {self.steps_label(small)})",
            "paper": "BYOL Table 16 (ImageNet, 300 epochs): from batch 4096 to 256 BYOL loses 0.7 points of linear top-1, "
                     "SimCLR 3.6; BYOL needs no negatives.",
            "context": [{"label": f"{m}, batch {b}: linear top-1 %", "per_seed": values(runs[m][b], "linear")}
                        for m in runs for b in (self.g.batch, small)],
            "comparisons": [compare(f"relative drop of linear top-1 from batch {self.g.batch} to {small} (% of the "
                                    f"batch-{self.g.batch} value): SimCLR's above BYOL's", "SimCLR", drop["SimCLR"],
                                    "BYOL", drop["BYOL"])],
        })

    def claim_c(self) -> None:
        variants = {"BYOL": ROWS[2], "no predictor": BYOL_NO_PREDICTOR, "fixed target (tau = 1)": BYOL_FIXED_TARGET}
        runs = {name: {s: self.pretrain(r, CLAIM_BUDGET, s, "c") for s in CLAIM_SEEDS} for name, r in variants.items()}
        self.claims.append({
            "id": "c", "title": f"BYOL's predictor and slow-moving target ({self.steps_label()})",
            "paper": "BYOL Table 5: without the predictor the representation collapses (5b); with a fixed random target "
                     "(tau_base = 1) linear top-1 falls to 18.8 against 72.5 (5a; ImageNet, 300 epochs).",
            "comparisons": [compare(f"linear top-1 %: BYOL above {name}", "BYOL", values(runs["BYOL"], "linear"), name,
                                    values(runs[name], "linear")) for name in list(variants)[1:]],
            "collapse": [{"label": name, "cells": runs[name]} for name in variants],
        })

    def claim_d(self) -> None:
        v2 = ROWS[1]
        big = Row(f"simclrv2_w{self.base_width * BIG_WIDTH:g}", v2.method,
                  (f"{KEYS['backbone_width']}={self.base_width * BIG_WIDTH:g}",), f"SimCLRv2, {BIG_WIDTH:g}x wider encoder")
        small_w = self.base_width * SMALL_WIDTH
        pre = {s: self.pretrain(v2, CLAIM_BUDGET, s, "d") for s in CLAIM_SEEDS}
        pre_big = {s: self.pretrain(big, CLAIM_BUDGET, s, "d") for s in CLAIM_SEEDS}
        ft = {(k, f): {s: self.finetune(pre[s], k, f, "d") for s in CLAIM_SEEDS}
              for k, f in ((0, .01), (1, .01), (1, .1), (1, 1.0))}
        ft_big = {f: {s: self.finetune(pre_big[s], 1, f, "d") for s in CLAIM_SEEDS} for f in (.01, 1.0)}
        comparisons = [compare("1% labels, fine-tuned top-1 %: from head layer 1 above layer 0", "layer 1",
                               values(ft[1, .01], "top1"), "layer 0", values(ft[0, .01], "top1"))]
        context = [{"label": f"teacher (layer 1) at {100 * f:g}% labels: top-1 %", "per_seed": values(ft[1, f], "top1")}
                   for f in (.01, .1, 1.0)]
        for f in (.01, .1):
            for width, name in ((None, "same size"), (small_w, f"{SMALL_WIDTH:g}x width")):
                student = {s: self.distill(ft[1, f][s], width, "d") for s in CLAIM_SEEDS}
                alone = {s: self.scratch(width or self.base_width, f, s, CLAIM_BUDGET, "d") for s in CLAIM_SEEDS}
                comparisons.append(compare(f"{100 * f:g}% labels, {name} student top-1 %: distilled above trained on the "
                                           "labels alone", "distilled", values(student, "top1"), "labels alone",
                                           values(alone, "top1")))
        gain = {f: {s: ["gain", ft_big[f][s], ft[1, f][s], "top1"] for s in CLAIM_SEEDS} for f in (.01, 1.0)}
        comparisons.append(compare(f"gain of the {BIG_WIDTH:g}x wider encoder (fine-tuned top-1 points): at 1% labels above "
                                   "at 100%", "1%", gain[.01], "100%", gain[1.0]))
        context += [{"label": f"{BIG_WIDTH:g}x wider, layer 1, {100 * f:g}% labels: top-1 %",
                     "per_seed": values(ft_big[f], "top1")} for f in (.01, 1.0)]
        self.claims.append({
            "id": "d", "title": f"SimCLRv2 semi-supervised ({self.steps_label()} of pre-training)",
            "paper": "SimCLRv2: fine-tuning from the first layer of the 3-layer head beats layer 0, most with 1% labels "
                     "(Sec. 4.2, Fig. 5); distillation on unlabelled images beats the same student trained on the labels "
                     "(Table 3); a bigger encoder gains more with fewer labels (Fig. 1).",
            "context": context, "comparisons": comparisons,
        })


def values(cells_by_seed: dict, metric: str) -> dict:
    return {s: ["value", c, metric] for s, c in cells_by_seed.items()}


def compare(label: str, first_label: str, first: dict, second_label: str, second: dict) -> dict:
    """A claim's comparison: the first quantity (per seed) above the second."""
    return {"label": label, "first": {"label": first_label, "per_seed": first},
            "second": {"label": second_label, "per_seed": second}}


def registered_methods() -> set[str]:
    from selfsup.methods import METHODS

    return set(METHODS)


# ------------------------------------------------------------------------------------------------
# State of a cell on disk


def journal_path(root: Path, cid: str) -> Path:
    return root / "logs" / f"{cid}.json"


def cell_state(root: Path, cell: Cell) -> tuple[str, str]:
    """``(state, detail)``: done, stale (made with other settings), partial, started, evaluating, waiting or new."""
    done = cells.read_json(root / cell.id / "cell.json")
    journal = cells.read_json(journal_path(root, cell.id)) or {}
    for made in (done, journal):
        if made and made.get("spec") != cell.spec:
            return "stale", "made with other settings"
    if done:
        m = done.get("metrics", {})
        return "done", ", ".join(f"{k} {v:.2f}" for k, v in m.items() if v is not None)
    run = root / cell.id
    if cell.kind in ("pretrain", "random"):
        state, step = cells.pretrain_state(run, cell.steps)
        if state == "done":
            return "evaluating", "pre-trained; evaluations missing"
        if state == "partial":
            return "partial", f"checkpoint at step {step} of {cell.steps}"
        if state == "started":
            return "started", "no checkpoint yet (restarts)"
    elif cell.kind in ("finetune", "distill"):
        state, step = cells.labelled_state(run)
        if state == "partial":
            return "partial", f"checkpoint at step {step}"
    missing = [d for d in cell.deps if not (root / d / "cell.json").is_file()]
    return ("waiting", "for " + ", ".join(missing)) if missing else ("new", "")


def check_not_stale(root: Path, todo: list[Cell]) -> None:
    stale = [c.id for c in todo if cell_state(root, c)[0] == "stale"]
    if stale:
        raise SystemExit(f"reference: {len(stale)} cell(s) in {root} were made with other settings than this command's "
                         f"(first: {stale[0]}; its command is in {journal_path(root, stale[0])}); rerun with the flags "
                         "that made them, or use another --root (or delete those folders)")


# ------------------------------------------------------------------------------------------------
# Running: the scheduler (this process) and the workers (one process per cell)


def git_commit() -> str | None:
    """The checkout's commit, or ``SELFSUP_COMMIT`` where the tree is a copy without git (a GPU machine's)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SELFSUP_COMMIT") or None


def launch(root: Path, cell: Cell, commit: str | None) -> subprocess.Popen:
    """Start the worker of ``cell`` (cwd = the root, one thread), after writing its settings into its journal."""
    path = journal_path(root, cell.id)
    journal = cells.read_json(path) or {"sessions": []}
    journal.update(spec=cell.spec, free=[str(a) for a in cell.free], resume=[str(a) for a in cell.resume],
                   cell=cell.record(), commit=commit)
    cells.write_json(path, journal)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread per cell
    log = open(root / "logs" / f"{cell.id}.log", "a")
    log.write(f"=== {now()} worker for {cell.id}\n")
    log.flush()
    try:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--cell-worker", cell.id], cwd=root,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_cells(plan: Plan, selected: list[Cell], jobs: int, results_path: Path) -> int:
    """Run ``selected`` (dependencies first), ``jobs`` at a time; returns the exit status."""
    root = plan.g.root
    (root / "logs").mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    todo = [c for c in selected if cell_state(root, c)[0] != "done"]
    for c in selected:
        if c not in todo:
            print(f"[reference] {c.id}: done, skipped", flush=True)
    running: dict[str, tuple[Cell, subprocess.Popen, float]] = {}
    failed: set[str] = set()

    def stop(signum, frame):  # once: a second SIGTERM must not break off the stopping of the cells
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while todo or running:
            for c in list(todo):
                if len(running) >= jobs:
                    break
                if any(d in failed for d in c.deps):
                    print(f"[reference] {c.id}: not run, it needs {', '.join(d for d in c.deps if d in failed)}", flush=True)
                    failed.add(c.id)
                    todo.remove(c)
                elif all((root / d / "cell.json").is_file() for d in c.deps):
                    state, detail = cell_state(root, c)
                    about = f"{state}: {detail}" if detail else state
                    print(f"[reference] {c.id}: start ({about}); log {root / 'logs' / c.id}.log", flush=True)
                    running[c.id] = (c, launch(root, c, commit), time.perf_counter())
                    todo.remove(c)
            if not running:
                if todo:  # dependencies that are neither selected nor finished
                    for c in todo:
                        print(f"[reference] {c.id}: not run, waiting for cells that did not finish", flush=True)
                    failed.update(c.id for c in todo)
                break
            time.sleep(0.2)
            for cid, (c, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[cid]
                record = cells.read_json(root / cid / "cell.json")
                if proc.returncode == 0 and record:
                    m = ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items() if v is not None)
                    print(f"[reference] {cid}: done, {m} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
                    write_results(plan, results_path)
                else:
                    failed.add(cid)
                    tail = (root / "logs" / f"{cid}.log").read_text().splitlines()[-3:]
                    print(f"[reference] {cid}: FAILED (status {proc.returncode}); last lines of "
                          f"{root / 'logs' / cid}.log:\n  " + "\n  ".join(tail), flush=True)
    except KeyboardInterrupt:
        for c, proc, _ in running.values():
            proc.terminate()
        for c, proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        write_results(plan, results_path)
        print(f"[reference] interrupted; {len(running)} cell(s) stopped. Rerun the same command to continue them.",
              flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_results(plan, results_path)
    print(f"[reference] {len(selected) - len(failed)} of {len(selected)} cells finished; results in {results_path}",
          flush=True)
    return 1 if failed else 0


def work(cid: str) -> int:
    """The worker of one cell (cwd = the grid's root): run what is missing, then write ``CELL/cell.json``."""
    import torch

    torch.set_num_threads(1)
    jpath = journal_path(Path("."), cid)
    journal = cells.read_json(jpath)
    spec, free, resume, info = journal["spec"], journal["free"], journal["resume"], journal["cell"]
    run = Path(cid)

    def log_session(session):
        if session is not None:
            journal["sessions"].append({**session, "ended": now()})
            cells.write_json(jpath, journal)

    kind, argv = spec["kind"], spec["argv"]
    results = {}
    if kind in ("pretrain", "random"):
        log_session(cells.pretrain(run, [*argv, *free], spec["steps"], resume, sys.stdout))
        device = ["--device", next(a.split("=", 1)[1] for a in resume if a.startswith(f"{KEYS['device']}="))]
        baseline = ["--baseline", "random-init"] if kind == "random" else []
        suffix = "_random-init" if kind == "random" else ""
        for k in ("linear", "knn"):
            results[k], session = cells.evaluate(k, run / f"eval_{k}{suffix}.json", ["--run", run, *baseline, *device],
                                                 sys.stdout)
            log_session(session)
    elif kind == "pixels":
        for k in ("linear", "knn"):
            results[k], session = cells.evaluate(k, run / f"eval_{k}_pixels.json", [*argv, *free], sys.stdout)
            log_session(session)
    else:
        results["result"], session = cells.labelled(argv[0], run, [*argv[1:], *free], resume, sys.stdout)
        log_session(session)
    if "result" in results:
        r = results["result"]
        metrics = {"top1": r["top1"]}
        details = {"top1": r["top1"], "top5": r.get("top5"), "steps": r.get("steps")}
    else:
        metrics = {k: results[k]["top1"] for k in ("linear", "knn")}
        keep = ("top1", "top5", "C", "converged", "feature_dim", "num_train", "num_test", "k", "temperature", "solver")
        details = {k: {key: results[k].get(key) for key in keep if key in results[k]} for k in ("linear", "knn")}
    config = cells.config_summary(run) if (run / "config.yaml").is_file() else None
    device = (config or {}).get("run", {}).get("device") or next(
        (free[i + 1] for i, a in enumerate(free) if a == "--device"), "cpu")
    mach = {**cells.machine(), "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        mach["gpu"] = torch.cuda.get_device_name(torch.device(device))
    import selfsup

    record = {**info, "spec": spec, "metrics": metrics, "results": details, "config": config,
              "collapse": cells.collapse_summary(run) if kind == "pretrain" else None,
              "wall_seconds": round(sum(s.get("seconds", 0) for s in journal["sessions"]), 1),
              "sessions": journal["sessions"], "machine": mach, "finished": now(), "commit": journal.get("commit"),
              "selfsup_version": selfsup.__version__, "torch_version": torch.__version__}
    cells.write_json(run / "cell.json", record)
    return 0


def write_results(plan: Plan, path: Path) -> dict:
    """Every finished cell under the root (``*/cell.json``), with the grid's settings and claims, as one JSON."""
    root = plan.g.root
    done = [r for r in (cells.read_json(p) for p in sorted(root.glob("*/cell.json"))) if r]
    planned = {c.id for c in plan.cells.values()}
    out = {
        "about": "benchmarks/reference.py: the reference grid (every finished cell under the root); "
                 "`python benchmarks/reference.py --report` turns it into tables and plots",
        "updated": now(), "root": str(root), "command": ["python", "benchmarks/reference.py", *sys.argv[1:]],
        "commit": git_commit(),
        "grid": {"dataset": plan.g.dataset, "batch_size": plan.g.batch, "steps_scale": plan.g.scale,
                 "sets": list(plan.g.sets), "device": plan.g.device,
                 "rows": [{"name": r.name, "method": r.method, "sets": list(r.sets), "about": r.about}
                          for r in plan.g.rows],
                 "columns": {str(b): {"steps": plan.steps_of(b, plan.g.batch), "seeds": list(s)}
                             for b, s in COLUMNS.items()},
                 "claim_seeds": list(CLAIM_SEEDS), "keys": KEYS},
        "claims": plan.claims,
        "pending": sorted(planned - {r["id"] for r in done}),
        "cells": done,
    }
    cells.write_json(path, out)
    return out


# ------------------------------------------------------------------------------------------------
# The report: tables and plots from the JSON alone


def quantity(expr: list, by_id: dict) -> float | None:
    """One claim quantity: ``["value", cell, metric]``, ``["drop", big_batch_cell, small_batch_cell, metric]`` (the
    relative drop, % of the first) or ``["gain", a, b, metric]`` (a - b, points); None if a cell is missing."""
    op, *ids, metric = expr
    vals = [(by_id.get(i) or {}).get("metrics", {}).get(metric) for i in ids]
    if any(v is None for v in vals):
        return None
    if op == "value":
        return vals[0]
    if op == "drop":
        return 100.0 * (vals[0] - vals[1]) / vals[0]
    if op == "gain":
        return vals[0] - vals[1]
    raise ValueError(f"unknown claim quantity {op!r}")


def judge(first: list[float], second: list[float], expected: int) -> dict:
    """Mean ± sample sd of each side, their difference in points and in pooled sds, and the verdict.

    ``holds``: the first side's mean - sd is above the second's mean + sd (the seed spread separates them);
    ``does not hold``: the reverse; ``not resolved``: the intervals overlap; ``incomplete``: fewer than two seeds.
    """
    m1, s1 = cells.mean_sd(first)
    m2, s2 = cells.mean_sd(second)
    n = min(len(first), len(second))
    out = {"n": n, "first_mean": m1, "first_sd": s1, "second_mean": m2, "second_sd": s2,
           "difference": None, "difference_sds": None}
    if n < 2 or s1 is None or s2 is None:
        out["verdict"] = f"incomplete ({n} of {expected} seeds)"
        return out
    diff = m1 - m2
    pooled = math.sqrt((s1 ** 2 + s2 ** 2) / 2)
    out.update(difference=diff, difference_sds=diff / pooled if pooled > 0 else math.copysign(math.inf, diff))
    if m1 - s1 > m2 + s2:
        out["verdict"] = "holds"
    elif m2 - s2 > m1 + s1:
        out["verdict"] = "does not hold (the reverse is separated)"
    else:
        out["verdict"] = "not resolved (within the seed spread)"
    if n < expected and out["verdict"] == "holds":
        out["verdict"] = f"holds on {n} of {expected} seeds"
    return out


def fmt(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return "-"
    if n > 1 and sd is not None:
        return f"{mean:.2f} ± {sd:.2f}" + ("" if n == 3 else f" ({n} seeds)")
    return f"{mean:.2f} (1 seed)"


def table_cells(data: dict) -> dict:
    """(row, budget) -> the grid rows' pre-training cells in the grid's columns (their steps at the grid's batch
    size and --steps-scale; a root may also hold cells of other scales), for the main tables and the plots.
    Seeds that a claim adds to a grid cell (BYOL and SimCLR at the longest budget) count too."""
    out: dict = {}
    batch, columns = data["grid"]["batch_size"], data["grid"]["columns"]
    rows = {r["name"] for r in data["grid"]["rows"]} | {c["row"] for c in data["cells"] if "grid" in c.get("groups", ())}
    for c in data["cells"]:
        column = columns.get(str(c["budget"]))
        if (c["kind"] == "pretrain" and c["row"] in rows and c.get("batch_size") == batch and column
                and c["steps"] == column["steps"]):
            out.setdefault((c["row"], c["budget"]), []).append(c)
    return out


def row_order(data: dict, table: dict) -> list[str]:
    rows = [r["name"] for r in data["grid"]["rows"]]
    extra = sorted({row for row, _ in table} - set(rows))
    return [r for r in rows if any(row == r for row, _ in table)] + extra


def claim_table(claim: dict, by_id: dict, expected: int) -> tuple[str, str]:
    """The claim's markdown (context, comparisons, collapse verdicts) and its overall verdict."""
    lines = []
    if claim.get("context"):
        rows = []
        for ctx in claim["context"]:
            vals = [v for v in (quantity(e, by_id) for e in ctx["per_seed"].values()) if v is not None]
            m, s = cells.mean_sd(vals)
            rows.append({"what": ctx["label"], "value": fmt(m, s, len(vals))})
        lines += [cells.markdown_table(rows, [("what", "run"), ("value", "mean ± sd")]), ""]
    rows, verdicts = [], []
    for comp in claim["comparisons"]:
        seeds = [s for s in comp["first"]["per_seed"] if s in comp["second"]["per_seed"]]
        pairs = [(quantity(comp["first"]["per_seed"][s], by_id), quantity(comp["second"]["per_seed"][s], by_id))
                 for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        j = judge([a for a, _ in pairs], [b for _, b in pairs], expected)
        verdicts.append(j["verdict"])
        rows.append({"comparison": comp["label"],
                     "first": f"{comp['first']['label']}: {fmt(j['first_mean'], j['first_sd'], j['n'])}",
                     "second": f"{comp['second']['label']}: {fmt(j['second_mean'], j['second_sd'], j['n'])}",
                     "diff": "-" if j["difference"] is None else f"{j['difference']:+.2f}",
                     "sds": "-" if j["difference_sds"] is None else f"{j['difference_sds']:+.1f}",
                     "verdict": f"**{j['verdict']}**"})
    lines += [cells.markdown_table(rows, [("comparison", "claim"), ("first", "first (mean ± sd)"),
                                          ("second", "second (mean ± sd)"), ("diff", "difference"),
                                          ("sds", "difference / pooled sd"), ("verdict", "here")])]
    if claim.get("collapse"):
        rows = []
        for variant in claim["collapse"]:
            found = [by_id[c] for c in variant["cells"].values() if c in by_id]
            col = [c["collapse"] for c in found if c.get("collapse")]
            warned = [c["warned_at_step"] for c in col if c["collapsed"]]
            if not col:
                verdict = "-"
            elif warned:
                verdict = f"collapse in {len(warned)} of {len(col)} runs (warned at step {', '.join(map(str, warned))})"
            else:
                verdict = f"no warning in {len(col)} of {len(col)} runs"
            finals = [c["final"] for c in col]
            m, s = cells.mean_sd(finals)
            thr = col[0]["threshold"] if col else None
            rows.append({"variant": variant["label"], "verdict": verdict,
                         "final": "-" if m is None else (f"{m:.4f}" + (f" ± {s:.4f}" if s is not None else "")),
                         "threshold": "-" if thr is None else f"{thr:.4f}"})
        lines += ["", "The collapse monitor (`collapse_std`, the per-dimension std of the normalised projections; "
                  "healthy is about 1/sqrt(d)), read from each run:", "",
                  cells.markdown_table(rows, [("variant", "variant"), ("verdict", "monitor's verdict"),
                                              ("final", "final collapse_std"), ("threshold", "warning threshold")])]
    if any(v.startswith("incomplete") for v in verdicts):
        overall = "incomplete: not every cell has finished"
    elif all(v.startswith("holds") for v in verdicts):
        overall = "yes"
    elif any(v.startswith("does not hold") for v in verdicts):
        overall = "no"
    else:
        overall = "not resolved"
    return "\n".join(lines), overall


def plot(data: dict, table: dict, metric: str, path: Path) -> None:
    """Accuracy against pre-training steps, one line per row, the seed sd as error bars, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in row_order(data, table):
        points = sorted((cs[0]["steps"], [c["metrics"][metric] for c in cs]) for (r, _), cs in table.items() if r == row)
        xs = [x for x, _ in points]
        ms = [cells.mean_sd(v)[0] for _, v in points]
        sds = [cells.mean_sd(v)[1] or 0.0 for _, v in points]
        ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=row)
    for kind, style, name in (("pixels", "--", "raw pixels"), ("random", ":", "untrained encoder")):
        vals = [c["metrics"][metric] for c in data["cells"] if c["kind"] == kind]
        if vals:
            ax.axhline(cells.mean_sd(vals)[0], color="gray", linestyle=style, label=name)
    ax.set_xscale("log")
    ticks = sorted({cs[0]["steps"] for cs in table.values()})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"pre-training steps (batch {data['grid']['batch_size']})")
    ax.set_ylabel(f"{'linear probe' if metric == 'linear' else 'kNN'} top-1 %")
    ax.set_title(f"{data['grid']['dataset']}: {'linear probe' if metric == 'linear' else 'kNN (k 200, t 0.1)'}; "
                 "mean ± sd over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(json_path: Path, md_path: Path, plot_prefix: str) -> str:
    """Write the results page (markdown tables, plots) from the grid's JSON alone; returns the markdown."""
    data = json.loads(Path(json_path).read_text())
    by_id = {c["id"]: c for c in data["cells"]}
    table = table_cells(data)
    budgets = sorted({b for _, b in table})
    rows = row_order(data, table)
    steps_at = {b: cs[0]["steps"] for (_, b), cs in sorted(table.items())}
    md_dir = Path(md_path).parent
    lines = ["# Reference results", "",
             f"<!-- written by `python benchmarks/reference.py --report --json {json_path} --md {md_path} "
             f"--plots {plot_prefix}`; "
             "edit the grid, not this page -->",
             "", f"Every number on this page comes from one JSON ({len(data['cells'])} finished cells, updated "
             f"{data['updated']}), written by", "", "```bash", " ".join(data["command"]), "```", "",
             f"Data set `{data['grid']['dataset']}`, batch {data['grid']['batch_size']}, each run with its method's recipe "
             f"(the cells' config summaries are in the JSON)" + (f", grid `--set` {' '.join(data['grid']['sets'])}"
                                                                  if data["grid"]["sets"] else "")
             + ". Linear: `selfsup eval linear` (logistic regression on the frozen features, C chosen on a held-out "
             "10%); kNN: `selfsup eval knn` (k 200, t 0.1). Mean ± sample sd over seeds 0, 1, 2 where there are "
             "three (else the number of seeds is given).", "",
             *([f"**{len(data['cells'])} of the grid's {len(data['cells']) + len(data['pending'])} cells are "
                "measured so far.** A `-`, a missing row or a missing column is a cell not run yet, never a zero; "
                "`python benchmarks/reference.py --list` shows each cell's state, and the command above without its "
                "filters (`--rows`, `--steps`, `--seeds`, `--groups`) runs the rest.", ""] if data.get("pending") else []),
             "Rows: " + "; ".join(f"`{r['name']}`: {r.get('about') or r['method']}" + (f" (`--set {' '.join(r['sets'])}`)"
                                                                                      if r.get("sets") else "")
                                  for r in data["grid"]["rows"]) + ".", ""]
    machines = sorted({(m["cpu_model"], m["cpu_bf16"], m.get("gpu") or m["device"])
                       for m in (c["machine"] for c in data["cells"])})
    lines += ["Machines: " + "; ".join(f"`lscpu` model {m!r}, native bf16 {'yes' if bf else 'no'}, device {d}"
                                       for m, bf, d in machines) + ".", ""]
    for metric, title in (("linear", "Linear probe top-1 %"), ("knn", "kNN top-1 %")):
        head = [("row", "row")] + [(str(b), f"{steps_at[b]:,} steps") for b in budgets]
        tr = []
        for row in rows:
            entry = {"row": row}
            for b in budgets:
                vals = [c["metrics"][metric] for c in table.get((row, b), [])]
                m, s = cells.mean_sd(vals)
                entry[str(b)] = fmt(m, s, len(vals))
            tr.append(entry)
        img = Path(f"{plot_prefix}{metric}.png")
        if tr:
            plot(data, table, metric, img)
        lines += [f"## {title}", "", cells.markdown_table(tr, head), "",
                  f"![{title}]({os.path.relpath(img, md_dir)})" if tr else "", ""]
    base = []
    for kind, name in (("pixels", "raw pixels"), ("random", "untrained encoder (step 0, init seeds 0-2)")):
        cs = [c for c in data["cells"] if c["kind"] == kind]
        if cs:
            entry = {"baseline": name}
            for metric in ("linear", "knn"):
                m, s = cells.mean_sd([c["metrics"][metric] for c in cs])
                entry[metric] = fmt(m, s, len(cs)) if kind == "random" else f"{m:.2f}"
            base.append(entry)
    if base:
        lines += ["## Baselines", "", cells.markdown_table(base, [("baseline", "baseline"), ("linear", "linear top-1 %"),
                                                                  ("knn", "kNN top-1 %")]), ""]
    wall = []
    for row in rows:
        entry = {"row": row}
        for b in budgets:
            secs = [c["wall_seconds"] for c in table.get((row, b), [])]
            entry[str(b)] = "-" if not secs else f"{cells.mean_sd(secs)[0] / 60:.1f}"
        wall.append(entry)
    if wall:
        lines += ["## Wall time per cell (minutes: pre-training and both evaluations, mean over seeds)", "",
                  cells.markdown_table(wall, [("row", "row")] + [(str(b), f"{steps_at[b]:,} steps") for b in budgets]), ""]
    expected = len(data["grid"]["claim_seeds"])
    lines += ["## Claims", "", "A claim holds here when the seed spread separates it: the first side's mean - sd is "
              "above the second's mean + sd. Difference / pooled sd: the difference of the means over "
              "sqrt((sd1² + sd2²) / 2).", ""]
    for claim in data["claims"]:
        text, overall = claim_table(claim, by_id, expected)
        lines += [f"### ({claim['id']}) {claim['title']}", "", f"The paper: {claim['paper']}", "", text, "",
                  f"**Holds here: {overall}.**", ""]
    if data.get("pending"):
        lines += [f"{len(data['pending'])} cells of the grid had not finished when the JSON was written.", ""]
    text = "\n".join(lines).rstrip() + "\n"
    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    Path(md_path).write_text(text)
    return text


# ------------------------------------------------------------------------------------------------


def select(plan: Plan, args) -> list[Cell]:
    """The cells the filters keep, plus the unfinished cells they need (in the plan's order)."""
    def split(v, kind=str):
        return None if v is None else {kind(x) for x in v.split(",") if x}

    rows, steps, seeds, groups = split(args.rows), split(args.steps, int), split(args.seeds, int), split(args.groups)
    keep = []
    for c in plan.cells.values():
        if rows is not None and c.row not in rows:
            continue
        if steps is not None and c.budget not in steps and c.budget != 0:
            continue
        if seeds is not None and c.seed not in seeds:
            continue
        if groups is not None and not (c.groups & groups):
            continue
        if args.only and not any(fnmatch.fnmatch(c.id, pat) for pat in args.only):
            continue
        keep.append(c.id)
    need = set(keep)
    stack = list(keep)
    while stack:
        for d in plan.cells[stack.pop()].deps:
            if d not in need and not (plan.g.root / d / "cell.json").is_file():
                need.add(d)
                stack.append(d)
    return [c for c in plan.cells.values() if c.id in need]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--root", type=Path, default=Path("runs/reference"), help="folder of the cells (default runs/reference)")
    ap.add_argument("--dataset", default="fashion-mnist", help="any `selfsup pretrain --dataset` (default fashion-mnist)")
    ap.add_argument("--data-dir", help="where data sets live (as `selfsup --data-dir`)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N: every command of every cell")
    ap.add_argument("--jobs", type=int, default=1, help="cells side by side, one thread each (default 1)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every length (steps, fine-tuning and distillation epochs), e.g. 0.01 for a smoke grid")
    ap.add_argument("--batch-size", type=int, default=BATCH, help=f"the grid's batch (default {BATCH}; claim (b) "
                    f"compares it with a {SMALL_BATCH_DIVISOR}x smaller one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="pre-training config key for every run (e.g. backbone_width=0.5), before each row's own")
    ap.add_argument("--row", dest="extra_rows", action="append", nargs="+", default=[], metavar="NAME METHOD [KEY=VALUE",
                    help="one more row: a name, a registered method and its --set overrides (repeatable)")
    ap.add_argument("--checkpoint-every", type=int, help="pre-training checkpoint interval (default: min(500, steps / 4))")
    ap.add_argument("--rows", help="run only these rows (comma-separated; also pixels, random, scratch, "
                    "byol_no_predictor, ...)")
    ap.add_argument("--steps", help="run only these columns (steps of batch 256 before --steps-scale, e.g. 1000,5000)")
    ap.add_argument("--seeds", help="run only these seeds (e.g. 0)")
    ap.add_argument("--groups", help="run only cells of these groups: grid, a, b, c, d (the claims)")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="run only cells whose name matches (shell patterns)")
    ap.add_argument("--list", action="store_true", help="print the selected cells and their state; run nothing")
    ap.add_argument("--report", action="store_true", help="write the markdown tables and plots from --json; run nothing")
    ap.add_argument("--json", type=Path, help="the results JSON (default ROOT/results.json)")
    ap.add_argument("--md", type=Path, default=Path("docs/results/grid.md"), help="--report: the markdown page")
    ap.add_argument("--plots", default="docs/results/grid/",
                    help="--report: plot path prefix (PREFIXlinear.png, PREFIXknn.png)")
    ap.add_argument("--cell-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell_worker:
        try:
            return work(args.cell_worker)
        except cells.CommandFailed as e:  # the command's own error line is just above, in the same log
            print(f"[reference] {args.cell_worker}: {e}", flush=True)
            return 1
        except KeyboardInterrupt:
            return 130
    json_path = args.json or args.root / "results.json"
    if args.report:
        if not json_path.is_file():
            raise SystemExit(f"reference: --report: no results JSON at {json_path}; run the grid first or give --json PATH")
        report(json_path, args.md, args.plots)
        print(f"[reference] wrote {args.md} and {args.plots}linear.png, {args.plots}knn.png", flush=True)
        return 0
    if args.jobs < 1 or not args.steps_scale > 0 or args.batch_size % SMALL_BATCH_DIVISOR:
        raise SystemExit(f"reference: --jobs must be >= 1, --steps-scale > 0 and --batch-size a multiple of "
                         f"{SMALL_BATCH_DIVISOR} (got {args.jobs}, {args.steps_scale}, {args.batch_size})")
    for key in parse_sets(args.sets):
        if key in GRID_FLAGS:
            raise SystemExit(f"reference: --set {key}=...: the grid sets {key} per cell; use {GRID_FLAGS[key]} instead")
    known = registered_methods()
    extra = []
    for spec in args.extra_rows:
        if len(spec) < 2 or spec[1] not in known:
            raise SystemExit(f"reference: --row {' '.join(spec)}: give NAME METHOD [KEY=VALUE ...] with a registered "
                             f"method ({', '.join(sorted(known))})")
        parse_sets(spec[2:])
        extra.append(Row(spec[0], spec[1], tuple(spec[2:])))
    rows = (*ROWS, *(r for r in NEW_METHOD_ROWS if r.method in known), *extra)
    if len({r.name for r in rows}) != len(rows):
        raise SystemExit("reference: --row: two rows have the same name; name each row once")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None  # the workers run inside the root
    grid = Grid(args.root.resolve(), args.dataset, data_dir, args.device, args.steps_scale, args.batch_size,
                tuple(args.sets), rows, args.checkpoint_every)
    plan = Plan(grid).build()
    selected = select(plan, args)
    if args.list:
        for c in selected:
            state, detail = cell_state(grid.root, c)
            print(f"{c.id:48s} {c.kind:9s} {','.join(sorted(c.groups)):10s} {state:10s} {detail}")
        counts: dict = {}
        for c in selected:
            counts[cell_state(grid.root, c)[0]] = counts.get(cell_state(grid.root, c)[0], 0) + 1
        print(f"{len(selected)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        return 0
    if not selected:
        raise SystemExit("reference: the filters (--rows, --steps, --seeds, --groups, --only) keep no cell; see --list")
    check_not_stale(grid.root, selected)
    return run_cells(plan, selected, args.jobs, json_path)


if __name__ == "__main__":
    raise SystemExit(main())
