"""The linear probe: multinomial logistic regression on frozen features, fitted to convergence.

This is the small-data practice the papers' linear evaluation stands in for (SimCLR App. B.6 notes
that an L2-regularised logistic regression on frozen features, with the regularisation chosen on a
held-out split, gives similar results to their SGD protocol; ``selfsup.protocols.linear_sgd`` is the papers'
protocol itself). The objective is scikit-learn's ``LogisticRegression`` (lbfgs) exactly::

    mean_i cross_entropy(W x_i + b, y_i) + ||W||^2 / (2 C n)        (the bias is not penalised)

and ``C`` is chosen on a stratified, seeded held-out part of the training features. Two solvers:

- ``"sklearn"`` (default): scikit-learn's lbfgs, the well-kept reference, on CPU.
- ``"torch"``: the same objective by full-batch L-BFGS in torch, for GPUs and feature sets too large
  for scikit-learn's float64 copy; ``tests/test_evaluation.py`` shows it equal to scikit-learn.

Nothing stops early: ``max_iter`` is a safety cap far above what the fits need, each fit records its
iterations and whether it converged, and a run that hits the cap says so (a warning and
``converged: false`` in the result). The C grid widens itself by a decade while the best value sits
at one end, then is refined by half-decades around the best; C is chosen from the validation curve
averaged over neighbouring half-decades (:func:`choose_c`), so a near-tie does not decide it. Each
fit starts from the nearest C's fit, or from zero where that already meets ``tol`` at the new C
(:func:`warm_start`), so no point of the validation curve repeats its neighbour.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Decades of C; at n = 60k standardised 1024-d features the best C is usually 0.01-1 (scikit-learn's
# default is 1.0). The grid widens itself when the best sits at an end.
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
C_LIMITS = (1e-7, 1e5)  # widening stops here (and the result says the best sat at the edge)
SOLVERS = ("sklearn", "torch")


@dataclass
class LogRegFit:
    """One fitted probe: weights ``(K, D)``, bias ``(K,)``, and how the solver ended."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    converged: bool

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype) @ self.weight.T + self.bias


def fit_logreg_sklearn(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int, tol: float,
                       init: LogRegFit | None = None) -> LogRegFit:
    """scikit-learn's ``LogisticRegression(C, lbfgs)``; ``init`` warm-starts it (the optimum is unique)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xn, yn = x.numpy(), y.numpy()
    present = np.unique(yn)
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=init is not None)
    if init is not None:  # scikit-learn warm-starts from coef_/intercept_ of the classes present
        clf.coef_ = init.weight[present].double().numpy().astype(xn.dtype)
        clf.intercept_ = init.bias[present].double().numpy().astype(xn.dtype)
        if len(present) == 2:  # binary: one row, the second class's margin
            clf.coef_ = clf.coef_[1:] - clf.coef_[:1]
            clf.intercept_ = clf.intercept_[1:] - clf.intercept_[:1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(xn, yn)
    unconverged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    iterations = int(np.max(clf.n_iter_))
    coef = torch.from_numpy(np.asarray(clf.coef_, dtype=np.float64))
    icpt = torch.from_numpy(np.asarray(clf.intercept_, dtype=np.float64))
    if len(present) == 2:
        coef = torch.cat([torch.zeros_like(coef), coef])
        icpt = torch.cat([torch.zeros_like(icpt), icpt])
    # Classes absent from y get no weights; a very negative bias keeps them from being predicted.
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), -1e4, dtype=torch.float64)
    idx = torch.from_numpy(present.astype(np.int64))
    weight[idx], bias[idx] = coef, icpt
    return LogRegFit(weight, bias, iterations, converged=not unconverged and iterations < max_iter)


def _lbfgs(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float, max_iter: int,
           tol: float) -> tuple[int, float]:
    """Minimise the probe's objective in place from ``(w, b)``; returns (iterations, largest |gradient|)."""
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 3, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=tol,
                            tolerance_change=64 * torch.finfo(x.dtype).eps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    grad_max = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    w.requires_grad_(False)
    b.requires_grad_(False)
    return int(opt.state[opt._params[0]].get("n_iter", 0)), grad_max


def fit_logreg_torch(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int, tol: float,
                     init: LogRegFit | None = None, device: str | torch.device = "cpu") -> LogRegFit:
    """The same objective and stopping rule as :func:`fit_logreg_sklearn`, by full-batch L-BFGS in torch.

    Stops when the largest absolute gradient entry is ``<= tol`` (scipy's ``pgtol``, as scikit-learn
    uses it). Each iteration reads the features twice, so the cost is memory traffic: the fit runs in
    float32 (half the traffic of float64) and, if float32's rounding stops it short of ``tol``, is
    polished in float64 from there. ``converged`` is whether the gradient reached ``tol``.
    """
    device = torch.device(device)
    n = x.shape[0]
    l2 = 1.0 / (C * n)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float32, device=device)
    b = torch.zeros(num_classes, dtype=torch.float32, device=device)
    if init is not None:
        w.copy_(init.weight)
        b.copy_(init.bias.clamp_min(-50.0))
    xd, yd = x.to(device, torch.float32), y.to(device)
    iterations, grad_max = _lbfgs(xd, yd, w, b, l2, max_iter, tol)
    if grad_max > tol and iterations < max_iter:
        xd = xd.double()
        w, b = w.double(), b.double()
        more, grad_max = _lbfgs(xd, yd, w, b, l2, max_iter - iterations, tol)
        iterations += more
    return LogRegFit(w.cpu().double(), b.cpu().double(), iterations, converged=grad_max <= tol)


def start_gradient(x: torch.Tensor, y: torch.Tensor, C: float, init: LogRegFit) -> float:
    """Largest |gradient| entry of the probe's objective at ``C`` evaluated at the warm start ``init``."""
    w = init.weight.to(torch.float64).clone().requires_grad_(True)
    b = init.bias.to(torch.float64).clamp_min(-50.0).clone().requires_grad_(True)
    xd = x.to(torch.float64)
    loss = F.cross_entropy(xd @ w.T + b, y) + 0.5 / (C * x.shape[0]) * w.pow(2).sum()
    loss.backward()
    present = torch.unique(y)  # absent classes carry no weights in either solver
    return max(w.grad[present].abs().max().item(), b.grad[present].abs().max().item())


def warm_start(x: torch.Tensor, y: torch.Tensor, C: float, tol: float, init: LogRegFit | None) -> LogRegFit | None:
    """``init`` as the start of a fit at ``C``, unless it already meets ``tol`` there (then ``None``: a cold start).

    A fit warm-started from a neighbouring C's optimum begins with a gradient of only
    ``(l2_new - l2_old) x W`` plus what the neighbour's fit left; at n = 54k that is often already
    below ``tol`` = 1e-4, and the solver would "converge" in 0 iterations at the neighbour's weights,
    so the validation curve at this C would repeat the neighbour's. Such a fit starts from zero
    instead, as scikit-learn's own (cold) fit does, with the same ``tol``. (A tighter ``tol`` for warm
    starts would do too, but below ~1e-5 the torch solver's float32 pass cannot get there and every
    such fit is polished in float64 at several times the cost.)
    """
    if init is None or start_gradient(x, y, C, init) > tol:
        return init
    return None


def fit_logreg(x, y, num_classes, C, max_iter, tol, init=None, solver="sklearn", device="cpu") -> LogRegFit:
    if solver == "sklearn":
        return fit_logreg_sklearn(x, y, num_classes, C, max_iter, tol, init)
    if solver == "torch":
        return fit_logreg_torch(x, y, num_classes, C, max_iter, tol, init, device)
    raise ValueError(f"solver: unknown {solver!r}; use one of {', '.join(SOLVERS)}")


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, val) indices: ``round(fraction x n_c)`` of every class (at least 1 where it has 2+) held out."""
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        val.append(members[:k])
        fit.append(members[k:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def _accuracy(fit: LogRegFit, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (fit.scores(x).argmax(1) == y).double().mean().item()


@dataclass
class ProbeResult:
    """The fitted probe on all training features and everything needed to reproduce it."""

    fit: LogRegFit
    record: dict = field(default_factory=dict)


def choose_c(val_top1: dict[float, float]) -> float:
    """The C to refit with: the best validation top-1 after smoothing over neighbouring half-decades.

    A 6,000-image validation top-1 has a standard error of ~0.4 points, so two neighbouring C values
    within a few hundredths of each other are a tie, and the raw arg-max between them moves the test
    figure by up to the slope of the curve (0.35 points on SimCLR features, docs/benchmarks.md). Each
    half-decade C whose two neighbours (C / sqrt(10), C x sqrt(10)) were fitted is scored by the mean
    of the three validation top-1s, which follows the curve's peak rather than its noise; the C with
    the best score wins (exact ties: the smaller C, more regularisation). With no such C (a grid of
    one or two values, or one without half-decade neighbours) the raw arg-max is used.
    """
    def neighbour(c: float, step: float) -> float | None:
        return next((k for k in val_top1 if abs(math.log10(k / c) - step) < 1e-6), None)

    smoothed = {}
    for c in val_top1:
        lo, hi = neighbour(c, -0.5), neighbour(c, 0.5)
        if lo is not None and hi is not None:
            smoothed[c] = (val_top1[lo] + val_top1[c] + val_top1[hi]) / 3
    scores = smoothed or val_top1
    return max(scores, key=lambda c: (round(scores[c], 9), -c))


def _search_c(run, val_top1: dict, grid: list[float], widen: bool, refine: bool) -> tuple[list[float], bool]:
    """Fit the grid in increasing C, widen it while the best sits at an end, refine by half-decades.

    Returns the values added by widening and whether the best raw validation top-1 sat at the edge.
    """
    def best() -> float:
        return max(val_top1, key=lambda c: (val_top1[c], -c))

    # Increasing C (weaker regularisation, slower fits); stop once validation falls below the best:
    # the fits past the peak are the expensive ones and cannot win.
    for c in grid:
        run(c)
        if val_top1[c] < val_top1[best()]:
            break
    widened: list[float] = []
    while widen:
        b, lo, hi = best(), min(val_top1), max(val_top1)
        if b == lo and lo / 10 >= C_LIMITS[0]:
            widened.append(lo / 10)
            run(lo / 10)
        elif b == hi and hi * 10 <= C_LIMITS[1]:  # no value past the best yet: grow upwards
            widened.append(hi * 10)
            run(hi * 10)
        else:
            break
    b = best()
    at_edge = b in (min(val_top1), max(val_top1))
    if refine:
        for c in (b / math.sqrt(10), b * math.sqrt(10)):
            run(c)
    return widened, at_edge


def select_and_fit(xtr: torch.Tensor, ytr: torch.Tensor, num_classes: int, c_grid=DEFAULT_C_GRID,
                   val_fraction: float = 0.1, seed: int = 0, max_iter: int = 10000, tol: float = 1e-4,
                   solver: str = "sklearn", device: str | torch.device = "cpu", widen: bool = True,
                   refine: bool = True) -> ProbeResult:
    """Choose C on a held-out part of ``(xtr, ytr)``, then refit on all of it with that C.

    The grid's values are fitted in increasing order, each warm-started from the nearest C fitted
    so far (the optimum is unique, so the start changes only the time; :func:`warm_start` starts from
    zero instead where the neighbour's weights already meet ``tol``, so no fit stops where its neighbour ended). While the best validation top-1 sits at an end of
    the grid, the grid grows by a decade on that side (up to ``C_LIMITS``); then, with ``refine``,
    the two half-decades beside the best are tried, and :func:`choose_c` picks C from the
    validation curve smoothed over neighbouring half-decades (robust to near-ties).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: unknown {solver!r}; use one of {', '.join(SOLVERS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"c_grid must hold positive values, got {list(c_grid)}")
    fits: dict[float, LogRegFit] = {}
    val_top1: dict[float, float] = {}
    cold_restarts: list[float] = []
    fit_idx, val_idx = stratified_split(ytr, val_fraction, seed)
    xf, yf, xv, yv = xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]
    selecting = len(grid) > 1 and len(val_idx) > 0

    def run(c: float) -> None:
        near = min(fits, key=lambda k: abs(math.log(k / c))) if fits else None  # warm start: the nearest C
        init = warm_start(xf, yf, c, tol, fits.get(near))
        if near is not None and init is None:
            cold_restarts.append(c)
        fits[c] = fit_logreg(xf, yf, num_classes, c, max_iter, tol, init, solver, device)
        val_top1[c] = _accuracy(fits[c], xv, yv)

    widened, at_edge = _search_c(run, val_top1, grid, widen, refine) if selecting else ([], False)
    chosen = choose_c(val_top1) if selecting else grid[0]
    final = fit_logreg(xtr, ytr, num_classes, chosen, max_iter, tol, warm_start(xtr, ytr, chosen, tol, fits.get(chosen)),
                       solver, device)
    if not final.converged or not all(f.converged for f in fits.values()):
        warnings.warn(f"the linear probe did not converge in max_iter={max_iter} iterations "
                      f"(C={chosen:g}); its accuracy is a lower bound. Raise max_iter.")
    n = len(ytr)
    record = {
        "probe": "logistic-regression",
        "solver": f"{solver}-lbfgs",
        "objective": "mean cross-entropy + ||W||^2 / (2 C n), bias unpenalised (scikit-learn LogisticRegression)",
        "C": chosen,
        "l2": 1.0 / (chosen * n),
        "c_grid": sorted(fits) if selecting else [chosen],
        "c_grid_start": grid,
        "c_grid_widened": widened,
        "best_c_at_grid_edge": at_edge,
        "c_choice": "best validation top-1 averaged over each C and its two half-decade neighbours",
        "val_fraction": val_fraction,
        "val_split": f"stratified, seed {seed}",
        "num_val": int(len(val_idx)) if selecting else 0,
        "val_top1": {f"{c:g}": v for c, v in sorted(val_top1.items())},
        "val_iterations": {f"{c:g}": f.iterations for c, f in sorted(fits.items())},
        "iterations": final.iterations,
        "max_iter": max_iter,
        "tol": tol,
        "warm_start": "from the nearest C's fit, unless that already meets tol at the new C (then from zero)",
        "val_cold_restarts": [f"{c:g}" for c in cold_restarts],
        "converged": bool(final.converged and all(f.converged for f in fits.values())),
        "train_top1": _accuracy(final, xtr, ytr),
        "seed": seed,
    }
    return ProbeResult(final, record)
