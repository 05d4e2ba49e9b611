"""Multinomial logistic regression for many regularisation strengths at once, in float32, by L-BFGS.

The linear probe's objective (scikit-learn's ``LogisticRegression``) for every ``C`` of a batch::

    f_p(W, b) = mean_i cross_entropy(W x_i + b, y_i) + l2_p ||W||^2 / 2,     l2_p = 1 / (C_p n)

Why it is fast, and why it stays right:

- **One pass over the features serves every C.** The weights of all problems are stacked into one
  ``(P K, D)`` matrix, so each iteration reads the features once (two matrix products) whatever the
  number of C values; the cost of a probe is memory traffic, not arithmetic.
- **Preconditioned.** Frozen features are strongly correlated, which makes plain L-BFGS take hundreds
  of iterations. The solver works in the eigenbasis of the features' second-moment matrix, scaled by
  ``sqrt(a s_j + l2_p)`` (``s_j`` its eigenvalues, ``a`` the softmax curvature at the start): the
  Hessian there is close to the identity, and L-BFGS needs tens of iterations. The change of
  variables acts on the ``(K, D)`` weights only (a ``D x D`` product per iteration), never on the
  features, so no rotated copy of them is made.
- **Float32, bounded memory.** The features stay float32 and are read in row chunks; only per-chunk
  logits are held. Losses are summed in float64 so the line search can tell values apart near the
  optimum. A problem whose float32 line search stalls above the tolerance is finished in float64,
  chunk by chunk (never a float64 copy of the features).
- **Same stopping rule as scikit-learn**: the largest absolute entry of the gradient (in the original
  coordinates) at most ``tol``. A problem that reaches ``max_iter`` first is reported unconverged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HISTORY = 10           # L-BFGS memory, as scipy's default
ARMIJO = 1e-4          # sufficient-decrease constant of the backtracking line search
MAX_HALVINGS = 20      # a line search that needs more has stalled (rounding), not found a step
COV_ROWS = 20000       # rows used to estimate the preconditioner's second-moment matrix


@dataclass
class Preconditioner:
    """Eigenvectors ``basis`` (D, D) and eigenvalues ``scale`` (D,) of the features' second moment."""

    basis: torch.Tensor
    scale: torch.Tensor
    curvature: float

    @staticmethod
    def of(x: torch.Tensor, num_classes: int, seed: int = 0) -> "Preconditioner":
        rows = x
        if x.shape[0] > COV_ROWS:  # a sample estimates the spectrum well enough for a preconditioner
            g = torch.Generator().manual_seed(seed)
            rows = x[torch.randperm(x.shape[0], generator=g)[:COV_ROWS].to(x.device)]
        rows = rows.double()
        second = rows.T @ rows / rows.shape[0]
        evals, evecs = torch.linalg.eigh(second)
        # softmax curvature p (1 - p) at the uniform start, spread over the K classes
        curvature = (num_classes - 1) / num_classes ** 2
        return Preconditioner(evecs.to(x.dtype), evals.clamp_min(0).to(x.dtype), curvature)

    def diagonal(self, l2: torch.Tensor) -> torch.Tensor:
        """(P, D): the square root of the approximate Hessian's eigenvalues for each problem."""
        return (self.curvature * self.scale[None, :] + l2[:, None]).sqrt()


def loss_and_grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: torch.Tensor,
                  chunk: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective (P,) in float64 and its gradients (P, K, D), (P, K) for weights (P, K, D), biases (P, K)."""
    p_, k, d = w.shape
    n = x.shape[0]
    wf = w.reshape(p_ * k, d).to(dtype)
    bf = b.reshape(p_ * k).to(dtype)
    loss = torch.zeros(p_, dtype=torch.float64, device=x.device)
    gw = torch.zeros(p_ * k, d, dtype=dtype, device=x.device)
    gb = torch.zeros(p_ * k, dtype=dtype, device=x.device)
    for i in range(0, n, chunk):
        xc = x[i:i + chunk].to(dtype)
        yc = y[i:i + chunk]
        z = torch.addmm(bf, xc, wf.T).view(-1, p_, k)
        lse = z.logsumexp(-1)
        picked = z.gather(-1, yc.view(-1, 1, 1).expand(-1, p_, 1)).squeeze(-1)
        loss += (lse - picked).sum(0, dtype=torch.float64)
        r = z.sub_(lse.unsqueeze(-1)).exp_()  # softmax probabilities, in place of the logits
        r.scatter_add_(-1, yc.view(-1, 1, 1).expand(-1, p_, 1), torch.full_like(picked, -1.0).unsqueeze(-1))
        r = r.view(-1, p_ * k)
        gw.addmm_(r.T, xc)
        gb += r.sum(0)
    w64 = w.to(torch.float64)
    loss = loss / n + 0.5 * l2.to(torch.float64) * w64.pow(2).sum((1, 2))
    gw = gw.view(p_, k, d).div_(n) + l2.to(dtype)[:, None, None] * w.to(dtype)
    return loss, gw, gb.view(p_, k).div_(n)


@dataclass
class PathFit:
    """Weights (P, K, D), biases (P, K), iterations (P,) and converged (P,) of a batch of problems."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: list[int]
    converged: list[bool]


class _Problems:
    """The batch's state in preconditioned coordinates: ``W = u diag(1/d) V^T``, ``b = c / sqrt(a)``."""

    def __init__(self, pre: Preconditioner, l2: torch.Tensor):
        self.basis = pre.basis
        self.d = pre.diagonal(l2)              # (P, D)
        self.bias_scale = math.sqrt(pre.curvature)

    def to(self, dtype: torch.dtype) -> None:
        self.basis, self.d = self.basis.to(dtype), self.d.to(dtype)

    def to_weights(self, u: torch.Tensor, c: torch.Tensor, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        return (u / self.d[rows, None, :]) @ self.basis.T, c / self.bias_scale

    def from_weights(self, w: torch.Tensor, b: torch.Tensor, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        return (w @ self.basis) * self.d[rows, None, :], b * self.bias_scale

    def grad_to_coords(self, gw: torch.Tensor, gb: torch.Tensor, rows=slice(None)):
        return (gw @ self.basis) / self.d[rows, None, :], gb / self.bias_scale


def _inner(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Inner product of two (weights, biases) pairs of one problem."""
    return float((a[0] * b[0]).sum()) + float((a[1] * b[1]).sum())


def _direction(g, history: list) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS two-loop recursion for one problem's gradient ``g`` (u, c) and its (s, y, rho) history."""
    q = [g[0].clone(), g[1].clone()]
    alphas = []
    for s, yv, rho in reversed(history):
        a = rho * _inner(s, q)
        alphas.append(a)
        q[0] -= a * yv[0]
        q[1] -= a * yv[1]
    if history:
        s, yv, _ = history[-1]
        yy = _inner(yv, yv)
        gamma = _inner(s, yv) / max(yy, 1e-300)
        q[0] *= gamma
        q[1] *= gamma
    for (s, yv, rho), a in zip(history, reversed(alphas)):
        beta = rho * _inner(yv, q)
        q[0] += (a - beta) * s[0]
        q[1] += (a - beta) * s[1]
    return -q[0], -q[1]


def fit_path(x: torch.Tensor, y: torch.Tensor, num_classes: int, cs: list[float], *, max_iter: int, tol: float,
             init: tuple[torch.Tensor, torch.Tensor] | None = None, pre: Preconditioner | None = None,
             chunk: int = 16384) -> PathFit:
    """Fit the probe at every C of ``cs`` (batched; see the module docstring). ``init``: (P, K, D), (P, K)."""
    n, dim = x.shape
    device = x.device
    pre = pre or Preconditioner.of(x, num_classes)
    l2 = torch.tensor([1.0 / (c * n) for c in cs], dtype=torch.float32, device=device)
    probs = _Problems(pre, l2)
    count = len(cs)
    if init is None:
        w0 = torch.zeros(count, num_classes, dim, device=device)
        b0 = torch.zeros(count, num_classes, device=device)
    else:
        w0, b0 = init[0].to(device, torch.float32), init[1].to(device, torch.float32).clamp_min(-50.0)
    u, c = probs.from_weights(w0, b0)
    state = _State(count, max_iter)
    dtype = torch.float32
    while True:
        active = state.active()
        if not active:
            stalled = state.stalled_ones()
            if not stalled or dtype == torch.float64:
                break
            dtype = torch.float64  # float32 rounding stopped them short of tol: finish in float64, by chunks
            probs.to(dtype)
            u, c, l2 = u.to(dtype), c.to(dtype), l2.to(dtype)
            state.reset(stalled)
            continue
        _iterate(x, y, probs, u, c, l2, active, state, tol, chunk, dtype)
    w, b = probs.to_weights(u, c)
    return PathFit(w, b, state.iterations, state.converged)


class _State:
    """Per-problem L-BFGS bookkeeping: history, last loss and gradient, iterations, flags."""

    def __init__(self, count: int, max_iter: int):
        self.history: list[list] = [[] for _ in range(count)]
        self.loss: list[float | None] = [None] * count
        self.grad: list = [None] * count
        self.iterations = [0] * count
        self.converged = [False] * count
        self.stalled = [False] * count
        self.max_iter = max_iter

    def active(self) -> list[int]:
        return [p for p in range(len(self.iterations))
                if not self.converged[p] and not self.stalled[p] and self.iterations[p] < self.max_iter]

    def stalled_ones(self) -> list[int]:
        return [p for p in range(len(self.iterations))
                if self.stalled[p] and not self.converged[p] and self.iterations[p] < self.max_iter]

    def reset(self, active: list[int]) -> None:
        for p in active:
            self.history[p], self.loss[p], self.grad[p], self.stalled[p] = [], None, None, False


def _evaluate(x, y, probs, u, c, l2, rows, chunk, dtype):
    """Loss, gradient in coordinates, and max |gradient| in the original coordinates, for ``rows``."""
    w, b = probs.to_weights(u[rows], c[rows], rows)
    loss, gw, gb = loss_and_grad(x, y, w, b, l2[rows], chunk, dtype)
    gmax = torch.maximum(gw.abs().amax((1, 2)), gb.abs().amax(1)).float()
    gu, gc = probs.grad_to_coords(gw.to(u.dtype), gb.to(u.dtype), rows)
    return loss, (gu, gc), gmax


def _iterate(x, y, probs, u, c, l2, active, state, tol, chunk, dtype) -> None:
    """One L-BFGS iteration (direction, backtracking line search, history update) of every active problem."""
    needs = [p for p in active if state.loss[p] is None]
    if needs:
        r = torch.tensor(needs, device=u.device)
        loss, g, gmax = _evaluate(x, y, probs, u, c, l2, r, chunk, dtype)
        for j, p in enumerate(needs):
            state.loss[p], state.grad[p] = float(loss[j]), (g[0][j], g[1][j])
            if float(gmax[j]) <= tol:
                state.converged[p] = True
    active = [p for p in active if not state.converged[p]]
    if not active:
        return
    dirs = {}
    for p in active:
        d = _direction(state.grad[p], state.history[p])
        slope = _inner(d, state.grad[p])
        if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
            state.history[p] = []
            d = (-state.grad[p][0], -state.grad[p][1])
            slope = -_inner(d, d)
        step = 1.0 if state.history[p] else min(1.0, 1.0 / math.sqrt(-slope))
        dirs[p] = (d, slope, step)
    pending = list(active)
    start = {p: (u[p].clone(), c[p].clone()) for p in active}
    for _ in range(MAX_HALVINGS + 1):
        for p in pending:
            (du, dc), _, step = dirs[p]
            u[p] = start[p][0] + step * du
            c[p] = start[p][1] + step * dc
        r = torch.tensor(pending, device=u.device)
        loss, g, gmax = _evaluate(x, y, probs, u, c, l2, r, chunk, dtype)
        still = []
        for j, p in enumerate(pending):
            d, slope, step = dirs[p]
            if float(loss[j]) <= state.loss[p] + ARMIJO * step * slope:
                _accept(state, p, step, d, (g[0][j], g[1][j]), float(loss[j]), float(gmax[j]), tol)
            else:
                dirs[p] = (d, slope, step / 2)
                still.append(p)
        pending = still
        if not pending:
            break
    for p in pending:  # no decrease found: rounding at this precision; keep the start point
        u[p], c[p] = start[p]
        state.stalled[p] = True
        state.iterations[p] += 1


def _accept(state: _State, p: int, step: float, d, g, loss: float, gmax: float, tol: float) -> None:
    s = (step * d[0], step * d[1])
    yv = (g[0] - state.grad[p][0], g[1] - state.grad[p][1])
    sy = _inner(s, yv)
    if sy > 1e-12:
        state.history[p].append((s, yv, 1.0 / sy))
        if len(state.history[p]) > HISTORY:
            state.history[p].pop(0)
    state.loss[p], state.grad[p] = loss, g
    state.iterations[p] += 1
    state.stalled[p] = False
    if gmax <= tol:
        state.converged[p] = True
