"""The linear probe: multinomial logistic regression on frozen features, fitted to convergence.

This is the small-data practice the papers' linear evaluation stands in for (SimCLR App. B.6 notes
that an L2-regularised logistic regression on frozen features, with the regularisation chosen on a
held-out split, gives similar results to their SGD protocol; ``selfsup.protocols.linear_sgd`` is the papers'
protocol itself). The objective is scikit-learn's ``LogisticRegression`` (lbfgs) exactly::

    mean_i cross_entropy(W x_i + b, y_i) + ||W||^2 / (2 C n)        (the bias is not penalised)

and ``C`` is chosen on a stratified, seeded held-out part of the training features. Two solvers:

- ``"torch"`` (default): every C of the search fitted at once by preconditioned L-BFGS in float32
  (``selfsup.evaluation.logreg_solver``), on the CPU or a GPU, in bounded memory. The grid's decades
  and the half-decades between them form one batch, so a whole search reads the features about as
  often as one fit does.
- ``"sklearn"``: scikit-learn's lbfgs, the well-kept reference, one C after the other (each warm-started
  from its neighbour, or from zero where that already meets ``tol``: :func:`warm_start`).
  ``tests/test_evaluation.py`` shows the two equal.

Nothing stops early: ``max_iter`` is a safety cap far above what the fits need, each fit records its
iterations and whether it converged, and a run that hits the cap says so (a warning and
``converged: false`` in the result). The C grid widens itself by a decade while the best value sits
at one end, and is refined by half-decades; C is chosen from the validation curve averaged over
neighbouring half-decades (:func:`choose_c`), so a near-tie does not decide it.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from selfsup.evaluation.logreg_solver import Preconditioner, fit_path, loss_and_grad

# Decades of C; at n = 60k standardised 1024-d features the best C is usually 0.01-1 (scikit-learn's
# default is 1.0). The grid widens itself when the best sits at an end.
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
C_LIMITS = (1e-7, 1e5)  # widening stops here (and the result says the best sat at the edge)
SOLVERS = ("torch", "sklearn")


@dataclass
class LogRegFit:
    """One fitted probe: weights ``(K, D)``, bias ``(K,)``, and how the solver ended."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    converged: bool

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores, in the features' precision on their device (no float64 copy of large sets)."""
        w, b = self.weight.to(x.device), self.bias.to(x.device)
        if x.dtype != torch.float32:
            return x.to(w.dtype) @ w.T + b
        return torch.addmm(b.float(), x, w.float().T)


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


def fit_logreg_torch(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int, tol: float,
                     init: LogRegFit | None = None, device: str | torch.device = "cpu",
                     pre: Preconditioner | None = None) -> LogRegFit:
    """The same objective and stopping rule as :func:`fit_logreg_sklearn`, by preconditioned L-BFGS in torch.

    One C of :func:`selfsup.evaluation.logreg_solver.fit_path`: float32 features on ``device`` (read
    in row chunks), stopping when the largest absolute gradient entry is ``<= tol`` (scipy's
    ``pgtol``, as scikit-learn uses it). ``converged`` is whether the gradient reached ``tol``.
    """
    xd, yd = x.to(device, torch.float32), y.to(device)
    start = None if init is None else (init.weight[None].float(), init.bias[None].float())
    fit = fit_path(xd, yd, num_classes, [C], max_iter=max_iter, tol=tol, init=start, pre=pre)
    return LogRegFit(fit.weight[0].cpu().double(), fit.bias[0].cpu().double(), fit.iterations[0], fit.converged[0])


def start_gradient(x: torch.Tensor, y: torch.Tensor, C: float, init: LogRegFit) -> float:
    """Largest |gradient| entry of the probe's objective at ``C`` evaluated at the warm start ``init``.

    Computed in float64 one chunk of rows at a time (no float64 copy of the features).
    """
    w = init.weight.to(x.device, torch.float64)[None]
    b = init.bias.to(x.device, torch.float64).clamp_min(-50.0)[None]
    l2 = torch.tensor([1.0 / (C * x.shape[0])], dtype=torch.float64, device=x.device)
    _, gw, gb = loss_and_grad(x, y.to(x.device), w, b, l2, chunk=16384, dtype=torch.float64)
    present = torch.unique(y).to(x.device)  # absent classes carry no weights in either solver
    return max(gw[0][present].abs().max().item(), gb[0][present].abs().max().item())


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


def fit_logreg(x, y, num_classes, C, max_iter, tol, init=None, solver="torch", device="cpu") -> LogRegFit:
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
    return 100.0 * (fit.scores(x).argmax(1) == y.to(x.device)).double().mean().item()


@dataclass
class ProbeResult:
    """The fitted probe on all training features and everything needed to reproduce it."""

    fit: LogRegFit
    record: dict = field(default_factory=dict)


def choose_c(val_top1: dict[float, float]) -> float:
    """The C to refit with: the best validation top-1 after smoothing over neighbouring half-decades.

    A 6,000-image validation top-1 has a standard error of ~0.4 points, so two neighbouring C values
    within a few hundredths of each other are a tie, and the raw arg-max between them moves the test
    figure by up to the slope of the curve (0.35 points on SimCLR features). Each
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


def _with_half_decades(grid: list[float]) -> list[float]:
    """``grid`` plus the geometric midpoint of every two neighbours a decade apart (half-decades)."""
    out = set(grid)
    for lo, hi in zip(grid, grid[1:]):
        if abs(math.log10(hi / lo) - 1) < 1e-6:
            out.add(lo * math.sqrt(10))
    return sorted(out)


FIRST_BATCH = 5   # the batched search starts with the grid's five smallest values (1e-3..1e-1 by default)


def _search_batched(fit_batch, val_top1: dict, grid: list[float], widen: bool, refine: bool) -> tuple[list[float], bool]:
    """Fit the grid (with its half-decades when ``refine``) in batches of increasing C until the best
    validation top-1 has two fitted values on each side (or the grid, widened by decades while
    ``widen``, ends). Returns the values fitted outside the grid and whether the best sat at the edge.

    The large-C fits are the slow ones (weak regularisation) and cannot win once the curve has
    turned, so they are fitted only while the best is still near the top of what was fitted.
    """
    def best() -> float:
        return max(val_top1, key=lambda c: (val_top1[c], -c))

    todo = _with_half_decades(grid) if refine else list(grid)
    step = math.sqrt(10) if refine else 10.0
    fit_batch(todo[:FIRST_BATCH])
    todo = todo[FIRST_BATCH:]
    widened: list[float] = []
    while True:
        fitted = sorted(val_top1)
        i = fitted.index(best())
        above, below = len(fitted) - 1 - i, i
        if above < 2 and (todo or (widen and fitted[-1] * step <= C_LIMITS[1])):
            new, todo = todo[:2 - above], todo[2 - above:]
            while len(new) < 2 - above and widen and (new or fitted)[-1] * step <= C_LIMITS[1]:
                new.append((new or fitted)[-1] * step)
                widened.append(new[-1])
        elif below < 2 and widen and fitted[0] / step >= C_LIMITS[0]:
            new = [fitted[0] / step ** k for k in range(1, 3 - below) if fitted[0] / step ** k >= C_LIMITS[0]]
            widened += new
        else:
            break
        fit_batch(new)
    fitted = sorted(val_top1)
    return sorted(widened), best() in (fitted[0], fitted[-1])


class _TorchSearch:
    """The C search with the batched solver: features moved to ``device`` once, fits kept on the CPU."""

    def __init__(self, xf, yf, xv, yv, num_classes: int, max_iter: int, tol: float, device, say=None):
        self.say = say
        self.device = torch.device(device)
        self.xf, self.yf = xf.to(self.device, torch.float32), yf.to(self.device)
        self.xv, self.yv = xv.to(self.device, torch.float32), yv.to(self.device)
        self.num_classes, self.max_iter, self.tol = num_classes, max_iter, tol
        self.pre = Preconditioner.of(self.xf, num_classes)
        self.fits: dict[float, LogRegFit] = {}
        self.val_top1: dict[float, float] = {}
        self.cold_restarts: list[float] = []

    def fit_batch(self, cs: list[float]) -> None:
        """Fit ``cs`` as one batch, each from the nearest fitted C's weights unless those already meet
        ``tol`` at the new C (then from zero: the curve must not repeat a neighbour's point)."""
        cs = [c for c in cs if c not in self.fits]
        start = time.perf_counter()
        path = fit_path(self.xf, self.yf, self.num_classes, cs, max_iter=self.max_iter, tol=self.tol, pre=self.pre,
                        init=self._starts(cs))
        for i, c in enumerate(cs):
            fit = LogRegFit(path.weight[i].cpu().double(), path.bias[i].cpu().double(), path.iterations[i],
                            path.converged[i])
            self.fits[c] = fit
            self.val_top1[c] = _accuracy(fit, self.xv, self.yv)
        if self.say:
            self.say(_fitted_line(cs, self.fits, self.val_top1, time.perf_counter() - start))

    def _starts(self, cs: list[float]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.fits:
            return None
        near = [self.fits[min(self.fits, key=lambda k: abs(math.log(k / c)))] for c in cs]
        w = torch.stack([f.weight for f in near]).to(self.device, torch.float32)
        b = torch.stack([f.bias for f in near]).to(self.device, torch.float32).clamp_min(-50.0)
        l2 = torch.tensor([1.0 / (c * len(self.yf)) for c in cs], device=self.device)
        _, gw, gb = loss_and_grad(self.xf, self.yf, w, b, l2, chunk=16384)
        done = torch.maximum(gw.abs().amax((1, 2)), gb.abs().amax(1)) <= self.tol
        self.cold_restarts += [c for c, d in zip(cs, done.tolist()) if d]
        w[done], b[done] = 0.0, 0.0
        return w, b

    def final(self, xtr, ytr, C: float) -> LogRegFit:
        """The refit on every training feature, from the search's fit at ``C`` unless that already meets tol."""
        x, y = xtr.to(self.device, torch.float32), ytr.to(self.device)
        init = warm_start(x, y, C, self.tol, self.fits.get(C))
        start = time.perf_counter()
        fit = fit_logreg_torch(x, y, self.num_classes, C, self.max_iter, self.tol, init, self.device, self.pre)
        if self.say:
            self.say(_refit_line(C, len(y), fit, time.perf_counter() - start))
        return fit


def _fitted_line(cs: list[float], fits: dict, val_top1: dict, seconds: float) -> str:
    """One progress line of the C search: the values just fitted, their iterations, the best so far."""
    best = max(val_top1, key=lambda c: (val_top1[c], -c))
    its = " / ".join(f"{fits[c].iterations}" + ("" if fits[c].converged else " (not converged)") for c in cs)
    return (f"linear probe: C {', '.join(f'{c:.3g}' for c in cs)} fitted in {its} iterations ({seconds:.1f} s); "
            f"best validation top-1 so far {val_top1[best]:.2f}% at C {best:.3g}")


def _refit_line(C: float, n: int, fit: LogRegFit, seconds: float) -> str:
    """The progress line of the final fit on every training feature."""
    return (f"linear probe: refit at C {C:.3g} on all {n} training features in {fit.iterations} iterations "
            f"({seconds:.1f} s)" + ("" if fit.converged else ", not converged"))


def _say(line: str) -> None:
    print(f"[selfsup] {line}", file=sys.stderr, flush=True)


def select_and_fit(xtr: torch.Tensor, ytr: torch.Tensor, num_classes: int, c_grid=DEFAULT_C_GRID,
                   val_fraction: float = 0.1, seed: int = 0, max_iter: int = 10000, tol: float = 1e-4,
                   solver: str = "torch", device: str | torch.device = "cpu", widen: bool = True,
                   refine: bool = True, progress: bool = False) -> ProbeResult:
    """Choose C on a held-out part of ``(xtr, ytr)``, then refit on all of it with that C.

    ``solver="torch"``: the grid and, with ``refine``, the half-decades between its decades are
    fitted as one batch from zero (as scikit-learn's own fits start); ``"sklearn"``: one C after the
    other in increasing order, each warm-started from the nearest C fitted so far (:func:`warm_start`
    starts from zero instead where the neighbour's weights already meet ``tol``), stopping once
    validation falls past its peak, then the half-decades beside the best. Both widen the grid by a
    decade while the best validation top-1 sits at an end (up to ``C_LIMITS``), and :func:`choose_c`
    picks C from the validation curve smoothed over neighbouring half-decades (robust to near-ties).
    ``progress``: a line on stderr after each fit of the search and after the refit (values of C, iterations,
    seconds, the best validation top-1 so far), so a slow search shows where its time goes.
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
    fit_idx, val_idx = stratified_split(ytr, val_fraction, seed)
    xf, yf, xv, yv = xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]
    selecting = len(grid) > 1 and len(val_idx) > 0
    if solver == "torch":
        search = _TorchSearch(xf, yf, xv, yv, num_classes, max_iter, tol, device, _say if progress else None)
        widened, at_edge = (_search_batched(search.fit_batch, search.val_top1, grid, widen, refine)
                            if selecting else ([], False))
        fits, val_top1, cold_restarts = search.fits, search.val_top1, search.cold_restarts
        chosen = choose_c(val_top1) if selecting else grid[0]
        final = search.final(xtr, ytr, chosen)
    else:
        fits, val_top1, cold_restarts = {}, {}, []
        widened, at_edge = (_search_sequential(xf, yf, xv, yv, num_classes, max_iter, tol, fits, val_top1, cold_restarts,
                                               grid, widen, refine, _say if progress else None)
                            if selecting else ([], False))
        chosen = choose_c(val_top1) if selecting else grid[0]
        init = warm_start(xtr, ytr, chosen, tol, fits.get(chosen))
        start = time.perf_counter()
        final = fit_logreg_sklearn(xtr, ytr, num_classes, chosen, max_iter, tol, init)
        if progress:
            _say(_refit_line(chosen, len(ytr), final, time.perf_counter() - start))
    if not final.converged or not all(f.converged for f in fits.values()):
        warnings.warn(f"the linear probe did not converge in max_iter={max_iter} iterations "
                      f"(C={chosen:g}); its accuracy is a lower bound. Raise max_iter.")
    record = _record(solver, chosen, len(ytr), fits, val_top1, grid, widened, at_edge, val_fraction, seed,
                     int(len(val_idx)) if selecting else 0, final, max_iter, tol, cold_restarts)
    record["train_top1"] = _accuracy(final, xtr, ytr)
    return ProbeResult(final, record)


def _search_sequential(xf, yf, xv, yv, num_classes, max_iter, tol, fits, val_top1, cold_restarts, grid, widen,
                       refine, say=None) -> tuple[list[float], bool]:
    """scikit-learn's fits one C at a time, each warm-started from the nearest (:func:`_search_c`)."""
    def run(c: float) -> None:
        near = min(fits, key=lambda k: abs(math.log(k / c))) if fits else None  # warm start: the nearest C
        init = warm_start(xf, yf, c, tol, fits.get(near))
        if near is not None and init is None:
            cold_restarts.append(c)
        start = time.perf_counter()
        fits[c] = fit_logreg_sklearn(xf, yf, num_classes, c, max_iter, tol, init)
        val_top1[c] = _accuracy(fits[c], xv, yv)
        if say:
            say(_fitted_line([c], fits, val_top1, time.perf_counter() - start))

    return _search_c(run, val_top1, grid, widen, refine)


def _record(solver, chosen, n, fits, val_top1, grid, widened, at_edge, val_fraction, seed, num_val, final, max_iter,
            tol, cold_restarts) -> dict:
    batched = solver == "torch"
    return {
        "probe": "logistic-regression",
        "solver": "torch-lbfgs-batched-float32" if batched else "sklearn-lbfgs",
        "objective": "mean cross-entropy + ||W||^2 / (2 C n), bias unpenalised (scikit-learn LogisticRegression)",
        "C": chosen,
        "l2": 1.0 / (chosen * n),
        "c_grid": sorted(fits) if fits else [chosen],
        "c_grid_start": grid,
        "c_grid_widened": widened,
        "best_c_at_grid_edge": at_edge,
        "c_choice": "best validation top-1 averaged over each C and its two half-decade neighbours",
        "val_fraction": val_fraction,
        "val_split": f"stratified, seed {seed}",
        "num_val": num_val,
        "val_top1": {f"{c:g}": v for c, v in sorted(val_top1.items())},
        "val_iterations": {f"{c:g}": f.iterations for c, f in sorted(fits.items())},
        "iterations": final.iterations,
        "max_iter": max_iter,
        "tol": tol,
        "warm_start": ("search in batches of increasing C, the first from zero, later ones from the nearest C's "
                       "fit unless that already meets tol at the new C (then from zero); refit: from the search's "
                       "fit at C unless that already meets tol on all the training features") if batched else
                      "from the nearest C's fit, unless that already meets tol at the new C (then from zero)",
        "val_cold_restarts": [f"{c:g}" for c in cold_restarts],
        "converged": bool(final.converged and all(f.converged for f in fits.values())),
        "seed": seed,
    }
