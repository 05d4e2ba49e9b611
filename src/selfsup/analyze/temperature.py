"""``selfsup analyze temperature``: the NT-Xent temperature (SimCLR Table 5), BYOL as a reference.

SimCLR is pre-trained at each ``--temperatures`` value (same budget, same views) and evaluated
linearly; the paper finds an optimum in between (tau 0.05 / 0.1 / 0.5 / 1 gives 59.7 / 64.4 / 60.7 /
58.0 with L2 normalisation). The temperature is a SimCLR parameter only: BYOL's loss has none, so
BYOL (once registered in ``selfsup.methods.METHODS``) is one run at the same budget, drawn as a
horizontal reference line on the same plot.
"""
from __future__ import annotations

import argparse

from selfsup.analyze import arguments, common as C, outputs

DEFAULT_STEPS = 100
DEFAULT_BATCH = 128
DEFAULT_TEMPERATURES = "0.05,0.1,0.2,0.5,1.0"


def build_parser(prog: str = "selfsup analyze temperature") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "temperature", steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH, seeds=True)
    p.add_argument("--temperatures", default=DEFAULT_TEMPERATURES,
                   help=f"SimCLR temperatures (default {DEFAULT_TEMPERATURES})")
    p.add_argument("--methods", help="comma-separated methods (default: simclr and, when registered, byol); "
                   "the sweep applies to simclr, any other method is one reference run")
    return p


def parse_floats(flag: str, text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise C.ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise C.ConfigError(f"{flag}: expected positive numbers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> dict:
    temps = parse_floats("--temperatures", args.temperatures)
    methods = arguments.parse_methods(args.methods)
    ctx = C.StudyContext("temperature", args, {"temperatures": temps, "methods": methods})
    ctx.open()
    rows = []
    if "simclr" in methods:
        for t in temps:
            res = ctx.run_cell(f"simclr-t{t:g}", {"method": "simclr", "simclr": {"temperature": t}}, with_z=False)
            rows.append({"method": "simclr", "temperature": t, "linear_h": res["linear_h"],
                         "linear_h_std": res.get("linear_h_std"), "final_loss": res["final_loss"], "seconds": res["seconds"]})
    for m in methods:
        if m != "simclr":
            res = ctx.run_cell(m, {"method": m}, with_z=False)
            rows.append({"method": m, "temperature": None, "linear_h": res["linear_h"],
                         "linear_h_std": res.get("linear_h_std"), "final_loss": res["final_loss"], "seconds": res["seconds"]})
    outputs.write_csv(ctx.out / "temperature.csv", rows)
    baseline = C.random_init_cached(ctx)
    outputs.write_json(ctx.out / "results.json", {"rows": rows, "random_init": baseline, "temperatures": temps, "methods": methods})

    plt = outputs.pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.3))
    sim = [r for r in rows if r["method"] == "simclr"]
    if sim:
        outputs.line(ax, [r["temperature"] for r in sim], sim, "linear_h", "o-", label="simclr")
    for r in rows:
        if r["method"] != "simclr":
            ax.axhline(r["linear_h"], ls="--", color="tab:orange", label=f"{r['method']} (no temperature)")
            if r.get("linear_h_std"):
                ax.axhspan(r["linear_h"] - r["linear_h_std"], r["linear_h"] + r["linear_h_std"], color="tab:orange",
                           alpha=0.15, lw=0)
    seeds = f", mean ± sd of {args.seeds} seeds" if args.seeds > 1 else ""
    png = outputs.finish_log_axes(fig, ax, temps, "NT-Xent temperature",
                            f"Temperature, {ctx.dataset}, {args.steps} steps x {args.batch_size}{seeds}", baseline,
                            ctx.out / "temperature.png")

    best = max(sim, key=lambda r: r["linear_h"]) if sim else None
    lines = [
        f"SimCLR at {len(sim)} temperatures, {args.steps} steps of {args.batch_size} each; linear evaluation of h on "
        f"{args.train_images} / {args.test_images} images. The temperature applies to SimCLR only; other methods are "
        "one reference run each at the same budget.",
        "", *outputs.markdown_table(["method", "temperature", "linear top-1 %", "final loss"],
                              [[r["method"], "-" if r["temperature"] is None else f"{r['temperature']:g}",
                                outputs.pm(r, "linear_h"), outputs.fmt(r["final_loss"], 3)] for r in rows]),
        "",
    ]
    if best:
        lines.append(f"Best SimCLR temperature here: {best['temperature']:g} ({outputs.pm(best, 'linear_h')}%); "
                     + outputs.separation(best, sim, "linear_h", lambda r: f"{r['temperature']:g}") + ".")
    lines.append(f"Untrained encoder (random init), same probe: {baseline:.1f}%.")
    lines += ["The paper (Table 5, ImageNet, 100 epochs): 0.05 / 0.1 / 0.5 / 1 -> 59.7 / 64.4 / 60.7 / 58.0.",
              "", "![temperature](temperature.png)"]
    summary = ctx.write_summary("Temperature (SimCLR Table 5)", lines)
    return {"study": "temperature", "out": str(ctx.out), "figures": [str(png)], "summary": str(summary), "runs": len(rows)}
