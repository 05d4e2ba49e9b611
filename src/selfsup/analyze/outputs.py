"""What a study writes: JSON and CSV files (atomically), markdown tables and numbers, and matplotlib figures in the
studies' common style (log x axis, linear top-1 on y, the untrained encoder's baseline)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from selfsup.errors import ConfigError


def write_json(path: Path, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted study never leaves half a result file
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the studies draw their figures with matplotlib, which is not installed; "
                          "pip install 'selfsup[viz]'") from None
    return plt


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def pm(row: dict, key: str) -> str:
    """``row[key]``, with ``± std`` over seeds when the study ran several."""
    std = row.get(f"{key}_std")
    return fmt(row[key]) + ("" if std is None else f" ± {std:.1f}")


def not_separated(best: dict, rows: Sequence[dict], key: str) -> list[dict] | None:
    """The rows (``best`` left out) whose mean ± sd interval of ``key`` reaches ``best``'s: the seed spread
    does not separate them from it. None when the study ran one seed (no spread to judge by)."""
    sd = best.get(f"{key}_std")
    if sd is None:
        return None
    return [r for r in rows if r is not best and r.get(f"{key}_std") is not None
            and best[key] - sd <= r[key] + r[f"{key}_std"]]


def separation(best: dict, rows: Sequence[dict], key: str, name, most: int = 8) -> str:
    """A claim's qualifier: whether the seed spread separates ``best`` from the other ``rows``; ``name(row)``
    labels a row, and more than ``most`` unseparated rows are counted instead of listed."""
    tied = not_separated(best, rows, key)
    if tied is None:
        return "one seed, so the seed spread is unknown: gaps of 1-2 points may be noise (--seeds 3 measures it)"
    if not tied:
        return "ahead of every other by more than the seed spread (no mean ± sd interval overlaps its own)"
    others = len([r for r in rows if r is not best])
    names = ", ".join(str(name(r)) for r in tied) if len(tied) <= most else f"{len(tied)} of the other {others}"
    return f"not separated by the seed spread from {names} (mean ± sd intervals overlap)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def draw_baseline(ax, value: float) -> None:
    ax.axhline(value, ls=":", color="gray", label=f"untrained encoder ({value:.1f}%)")


def finish_log_axes(fig, ax, ticks: list, xlabel: str, title: str, baseline: float, path: Path, base: int = 10) -> Path:
    """The studies' common figure ending: baseline line, log x axis labelled at ``ticks``, linear top-1
    on y, grid, legend; saved to ``path`` (returned)."""
    draw_baseline(ax, baseline)
    ax.set_xscale("log", base=base)
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def line(ax, xs, rows: list[dict], key: str, fmt: str, **kw) -> None:
    """``rows[key]`` against ``xs``, with error bars (one standard deviation over seeds) when there are any."""
    errs = [r.get(f"{key}_std") for r in rows]
    yerr = [e or 0.0 for e in errs] if any(e is not None for e in errs) else None
    ax.errorbar(xs, [r[key] for r in rows], yerr=yerr, fmt=fmt, capsize=3 if yerr else 0, **kw)
