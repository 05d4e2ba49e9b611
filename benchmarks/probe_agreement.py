"""Does ``selfsup eval linear`` agree with scikit-learn? Our probe's top-1 vs the best LogisticRegression.

On the same standardised frozen features (a run's encoder with ``--run RUN``, raw pixels with
``--baseline pixels``; ``--run RUN --pixels`` does both, the run's features and then the raw pixels of
its dataset, and ends with one line each), prints our probe's test top-1 (``selfsup.evaluation.frozen.linear_eval``, the default
solver) beside scikit-learn's ``LogisticRegression`` (lbfgs, ``max_iter=10000``, cold start) with C
chosen on the same held-out split (stratified 10%, seed 0) from every half-decade 1e-4..1e1, refitted
on the whole training set; and the difference (the target: within 0.3 points). Two references:
C by the plain arg-max of scikit-learn's validation top-1 (what a user does by hand), and C by our
probe's rule (``choose_c``: the curve averaged over neighbouring half-decades) applied to
scikit-learn's own validation curve, which isolates the solvers from the selection rule.

    python benchmarks/probe_agreement.py --baseline pixels --dataset fashion-mnist
    python benchmarks/probe_agreement.py --run runs/simclr-fmnist
    python benchmarks/probe_agreement.py --run runs/simclr-fmnist --pixels   # both, one command

With ``--run`` it first times, side by side in this process, a few dozen training steps of the run's
own config (``selfsup pretrain`` of the same method, encoder, batch and data) and the whole of
``selfsup eval linear`` and ``selfsup eval knn`` on the run (loading, feature extraction, the C
search, the final fit, the test score), and prints each evaluation's cost in training steps
(targets: linear at most 400, kNN at most 100). ``--no-timing`` skips that.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


TARGET = 0.3  # points: the agreement target
STEP_TARGETS = {"linear": 400, "knn": 100}  # an evaluation's cost, in training steps of the run's config


def step_seconds(run_dir: str, steps: int = 60, skip: int = 20) -> float:
    """Seconds per training step of ``run_dir``'s config, from a fresh ``selfsup pretrain`` of ``steps``
    steps (kNN monitor off), timed between its logged steps ``skip`` and ``steps`` (warm-up excluded)."""
    import subprocess
    import sys
    import tempfile

    from selfsup.training.runs import load_run

    cfg = load_run(run_dir).config
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "selfsup", "pretrain", "--method", cfg.method, "--dataset", cfg.dataset,
               "--backbone", cfg.backbone, "--batch-size", str(cfg.batch_size), "--steps", str(steps),
               "--out", f"{tmp}/run", "--no-progress", "--set", "knn_monitor=false", "--set", "log_every=1",
               "--logger", "none"]
        if cfg.data_dir:
            cmd += ["--data-dir", cfg.data_dir]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(f"{tmp}/run/metrics.jsonl") as f:
            elapsed = {r["step"]: r["elapsed_sec"] for r in map(json.loads, f) if "elapsed_sec" in r}
    return (elapsed[steps] - elapsed[skip]) / (steps - skip)


def time_evaluations(run_dir: str) -> dict:
    """Wall seconds of ``selfsup eval linear`` and ``eval knn`` on the run, and in training steps."""
    import tempfile

    from selfsup.protocols.eval_run import evaluate

    per_step = step_seconds(run_dir)
    out = {"seconds_per_training_step": round(per_step, 4)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("linear", "knn"):
            t0 = time.perf_counter()
            res = evaluate(kind, run_dir, out=f"{tmp}/{kind}.json")
            sec = time.perf_counter() - t0
            out[kind] = {"seconds": round(sec, 1), "training_steps": round(sec / per_step, 1),
                         "target_steps": STEP_TARGETS[kind], "top1": round(res["top1"], 2)}
            print(f"selfsup eval {kind}: {sec:.1f} s = {sec / per_step:.0f} training steps of {per_step * 1000:.0f} ms "
                  f"(target at most {STEP_TARGETS[kind]}: {'met' if sec / per_step <= STEP_TARGETS[kind] else 'MISSED'}); "
                  f"top-1 {res['top1']:.2f}", flush=True)
    return out


def features(args):
    from selfsup.training.config import PretrainConfig
    from selfsup.data.datasets import load_dataset
    from selfsup.protocols.eval_run import PixelEncoder, random_init_encoder
    from selfsup.evaluation.frozen import extract_features
    from selfsup.training.runs import load_encoder, load_run

    run = load_run(args.run) if args.run else None
    cfg = run.config if run else PretrainConfig()
    name = args.dataset or cfg.dataset
    size = run.image_size if run else None
    train = load_dataset(name, "train", data_dir=args.data_dir or cfg.data_dir, image_size=size)
    test = load_dataset(name, "test", data_dir=args.data_dir or cfg.data_dir, image_size=size)
    size = size or train.image_size
    if args.baseline == "pixels":
        enc = PixelEncoder(train.num_channels, size)
    elif args.baseline == "random-init":
        enc = random_init_encoder(cfg, train.num_channels, size)
    else:
        enc = load_encoder(run)
    from selfsup.training.devices import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))  # as selfsup eval extracts them
    prep = run.preprocessing if run else None  # the run's statistics, as selfsup eval prepares images
    ftr, ytr = extract_features(enc, train, "cpu", size, precision=precision, preprocess=prep)
    fte, yte = extract_features(enc, test, "cpu", size, precision=precision, preprocess=prep)
    return ftr, ytr, fte, yte, train.num_classes, name


def sklearn_fit_score(xfit, yfit, xs, ys, C):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=10000).fit(xfit, yfit)
    return [100.0 * clf.score(x, y) for x, y in zip(xs, ys)], int(max(clf.n_iter_))


def compare(args, solver: str) -> dict:
    """Our probe and the scikit-learn reference on the features ``args`` names; the result as a dict."""
    from selfsup.evaluation.frozen import canonical_order, linear_eval, standardise
    from selfsup.evaluation.linear_probe import choose_c, stratified_split

    t0 = time.perf_counter()
    ftr, ytr, fte, yte, k, name = features(args)
    t1 = time.perf_counter()
    ours = linear_eval(ftr, ytr, fte, yte, k, solver=solver)
    t2 = time.perf_counter()
    order = canonical_order(ftr, ytr)  # the probe's own order of the samples: the same held-out split
    ftr, ytr = ftr[order], ytr[order]
    s_tr, s_te = (x.numpy() for x in standardise(ftr, fte))
    fit, val = stratified_split(ytr, 0.1, 0)
    grid = [10 ** (e / 2) for e in range(-8, 3)]
    y = ytr.numpy()
    jobs = [(s_tr[fit.numpy()], y[fit.numpy()], [s_tr[val.numpy()]], [y[val.numpy()]], c) for c in grid]
    if args.jobs > 1:
        from joblib import Parallel, delayed

        sel = Parallel(n_jobs=args.jobs)(delayed(sklearn_fit_score)(*j) for j in jobs)
    else:
        sel = [sklearn_fit_score(*j) for j in jobs]
    val_top1 = {c: s[0][0] for c, s in zip(grid, sel)}
    best = max(val_top1, key=lambda c: (val_top1[c], -c))
    (ref_train, ref_test), ref_iter = sklearn_fit_score(s_tr, y, [s_tr, s_te.astype(s_tr.dtype)], [y, yte.numpy()], best)
    rule = choose_c(val_top1)
    rule_test = ref_test if rule == best else \
        sklearn_fit_score(s_tr, y, [s_te.astype(s_tr.dtype)], [yte.numpy()], rule)[0][0]
    t3 = time.perf_counter()
    result = {
        "features": f"run {args.run}" if not args.baseline else f"{args.baseline} ({args.run or 'default config'})",
        "dataset": name, "num_train": len(ytr), "num_test": len(yte), "feature_dim": int(ftr.shape[1]),
        "ours_top1": round(ours["top1"], 2), "ours_C": ours["C"], "ours_solver": ours["solver"],
        "ours_converged": ours["converged"], "ours_train_top1": round(ours["train_top1"], 2),
        "sklearn_top1": round(ref_test, 2), "sklearn_C": best, "sklearn_train_top1": round(ref_train, 2),
        "sklearn_iterations": ref_iter,
        "difference": round(ours["top1"] - ref_test, 2),
        "sklearn_same_rule_C": rule, "sklearn_same_rule_top1": round(rule_test, 2),
        "difference_same_rule": round(ours["top1"] - rule_test, 2),
        "sklearn_val_top1": {f"{c:g}": round(v, 2) for c, v in val_top1.items()},
        "seconds": {"features": round(t1 - t0, 1), "ours": round(t2 - t1, 1), "sklearn_reference": round(t3 - t2, 1)},
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run")
    p.add_argument("--baseline", choices=("pixels", "random-init"))
    p.add_argument("--pixels", action="store_true",
                   help="with --run: also compare on the raw pixels of the run's dataset (two results)")
    p.add_argument("--dataset")
    p.add_argument("--data-dir")
    p.add_argument("--solver", default="auto", help="our probe's solver (auto, sklearn, torch)")
    p.add_argument("--jobs", type=int, default=1, help="scikit-learn reference fits in parallel (processes)")
    p.add_argument("--out", help="also write the result JSON here (a list with --pixels)")
    p.add_argument("--no-timing", action="store_true", help="with --run: skip timing the evaluations in training steps")
    p.add_argument("--no-reference", action="store_true",
                   help="skip scikit-learn's reference fits (the slow part): timing only")
    args = p.parse_args()
    if not args.run and not args.baseline:
        p.error("give --run RUN and/or --baseline pixels|random-init")
    if args.pixels and (not args.run or args.baseline):
        p.error("--pixels goes with --run RUN alone (it adds the raw-pixel comparison to the run's)")

    timing = None
    if args.run and not args.no_timing:
        timing = time_evaluations(args.run)
    if args.no_reference:
        if args.out and timing:
            with open(args.out, "w") as f:
                json.dump({"timing": timing}, f, indent=1)
        return
    todo = [args]
    if args.pixels:
        todo.append(argparse.Namespace(**{**vars(args), "baseline": "pixels"}))
    results = []
    for a in todo:
        results.append(compare(a, args.solver))
        print(json.dumps(results[-1], indent=1), flush=True)
    if timing:
        results[0]["timing"] = timing
    for r in results:
        met = "met" if abs(r["difference"]) <= TARGET else "MISSED"
        print(f"{r['features']}: ours {r['ours_top1']:.2f} (C {r['ours_C']:g}), scikit-learn "
              f"{r['sklearn_top1']:.2f} (C {r['sklearn_C']:g}), difference {r['difference']:+.2f}: "
              f"{met} (target within {TARGET})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results if args.pixels else results[0], f, indent=1)


if __name__ == "__main__":
    main()
