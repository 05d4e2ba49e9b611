"""``selfsup analyze head``: SimCLR Figure 8, the projection head g(.).

SimCLR is pre-trained with no head (the loss sees h; ``simclr.proj_layers=0``), a linear head
(``simclr.proj_layers=1``) and the paper's nonlinear head (Linear-BN-ReLU-Linear, ``simclr.proj_layers=2``), the
last two at several output dimensions; each run is then evaluated linearly on h and on z = g(h).
The paper finds nonlinear > linear (~3%) > none (>10%) on h, h > z (>10%), and that the output
dimension hardly matters.

Every run keeps the same encoder, views and budget (the study's ``--steps`` / ``--batch-size``);
the hidden width of the nonlinear head is the encoder's h width, as in the paper.
"""
from __future__ import annotations

import argparse

from selfsup.analyze import arguments, common as C, outputs

DEFAULT_STEPS = 100
DEFAULT_BATCH = 128
DEFAULT_DIMS = "16,64,256"
HEADS = {"none": 0, "linear": 1, "nonlinear": 2}


def build_parser(prog: str = "selfsup analyze head") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    arguments.add_common_args(p, "head", steps=DEFAULT_STEPS, batch_size=DEFAULT_BATCH, seeds=True)
    p.add_argument("--dims", default=DEFAULT_DIMS, help=f"output dimensions of the linear and nonlinear heads "
                   f"(default {DEFAULT_DIMS}; the default encoder's h is 64-d)")
    p.add_argument("--heads", default="none,linear,nonlinear", help="subset of none,linear,nonlinear")
    return p


def parse_int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise C.ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise C.ConfigError(f"{flag}: expected positive integers, got {text!r}")
    return sorted(set(values))


def parse_heads(text: str) -> list[str]:
    heads = [h.strip() for h in text.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEADS]
    if bad or not heads:
        raise C.ConfigError(f"--heads: unknown {bad or 'empty list'}; choose from {','.join(HEADS)}")
    return [h for h in HEADS if h in heads]


def head_cells(heads: list[str], dims: list[int]) -> list[tuple[str, int | None]]:
    """(head, output dim) per run; ``none`` has no output dimension of its own (z = h)."""
    return [(h, None) if h == "none" else (h, d) for h in heads for d in ([None] if h == "none" else dims)]


def run(args: argparse.Namespace) -> dict:
    dims = parse_int_list("--dims", args.dims)
    heads = parse_heads(args.heads)
    ctx = C.StudyContext("head", args, {"dims": dims, "heads": heads})
    ctx.open()
    rows = []
    for head, dim in head_cells(heads, dims):
        name = head if dim is None else f"{head}-{dim}"
        layer = {"method": "simclr", "simclr": {"proj_layers": HEADS[head]}}
        if dim is not None:
            layer["simclr"]["proj_out_dim"] = dim
        res = ctx.run_cell(name, layer, with_z=True)
        rows.append({"head": head, "out_dim": dim if dim is not None else res["h_dim"], "linear_h": res["linear_h"],
                     "linear_h_std": res.get("linear_h_std"), "linear_z": res["linear_z"],
                     "linear_z_std": res.get("linear_z_std"), "h_dim": res["h_dim"], "final_loss": res["final_loss"],
                     "seconds": res["seconds"]})
    outputs.write_csv(ctx.out / "head.csv", rows)
    baseline = C.random_init_cached(ctx)
    outputs.write_json(ctx.out / "results.json", {"rows": rows, "random_init": baseline, "dims": dims, "heads": heads})

    plt = outputs.pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    colours = {"none": "tab:gray", "linear": "tab:blue", "nonlinear": "tab:red"}
    for head in heads:
        rs = [r for r in rows if r["head"] == head]
        if head == "none":
            ax.axhline(rs[0]["linear_h"], color=colours[head], ls="-", label="no head (z = h)")
            continue
        xs = [r["out_dim"] for r in rs]
        outputs.line(ax, xs, rs, "linear_h", "o-", color=colours[head], label=f"{head}: h")
        outputs.line(ax, xs, rs, "linear_z", "s--", color=colours[head], alpha=0.6, label=f"{head}: z = g(h)")
    png = outputs.finish_log_axes(fig, ax, dims, "projection output dimensionality",
                            f"Projection head, SimCLR on {ctx.dataset}, {args.steps} steps x {args.batch_size}",
                            baseline, ctx.out / "head.png", base=2)

    table = outputs.markdown_table(["head", "output dim", "linear top-1 of h %", "of z %", "h - z"],
                             [[r["head"], r["out_dim"], outputs.pm(r, "linear_h"), outputs.pm(r, "linear_z"),
                               outputs.fmt(r["linear_h"] - r["linear_z"])] for r in rows])
    mean_h = {h: sum(r["linear_h"] for r in rows if r["head"] == h) / max(1, sum(r["head"] == h for r in rows))
              for h in heads}
    best = max(rows, key=lambda r: r["linear_h"])
    lines = [
        f"SimCLR Figure 8: {len(rows)} SimCLR runs of {args.steps} steps x {args.batch_size} on {ctx.dataset}, "
        f"linear evaluation of h and z on {args.train_images} / {args.test_images} images.",
        "", *table, "",
        "Mean linear top-1 of h per head: " + ", ".join(f"{h} {v:.1f}%" for h, v in mean_h.items()) + ".",
        f"Best on h: {label(best)} ({outputs.pm(best, 'linear_h')}%); "
        + outputs.separation(best, rows, "linear_h", label) + ".",
        f"Untrained encoder (random init), same probe: {baseline:.1f}%.",
        "The paper: nonlinear > linear by ~3%, > none by >10%; h > z by >10%; output dimension barely matters.",
        "", "![head](head.png)",
    ]
    summary = ctx.write_summary("Projection head (SimCLR Figure 8)", lines)
    return {"study": "head", "out": str(ctx.out), "figures": [str(png)], "summary": str(summary), "runs": len(rows)}


def label(row: dict) -> str:
    return "no head" if row["head"] == "none" else f"{row['head']}-{row['out_dim']}"
