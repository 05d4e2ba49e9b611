"""One self-contained HTML page per run: ``selfsup report RUN_DIR`` -> ``RUN_DIR/report.html``.

The page needs nothing but itself: styles are inline and every picture is a PNG inlined as a base64
``data:`` URI, so it can be mailed or attached to an issue. Sections: summary, evaluation results
(every ``*.json`` in the run folder holding a ``top1``), training curves (every numeric series of
``metrics.jsonl``: loss, learning rate, kNN accuracy, images/s, ...), the augmented-view grid, other
pictures found in the run folder (t-SNE plots, heatmaps), timing, and the resolved config.
Curves need matplotlib (``selfsup[viz]``); without it the page says so and shows the last values.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from selfsup.artifacts.report import read_metrics
from selfsup.errors import ConfigError

__all__ = ["render_html_report", "write_html_report", "curve_png"]

# Series drawn first, in this order, with these titles; any other numeric key follows.
_KNOWN_SERIES = {
    "loss": "training loss",
    "lr": "learning rate",
    "knn_top1": "kNN top-1 (%)",
    "images_per_sec": "images / s",
}
_NOT_SERIES = {"step", "epoch", "elapsed_sec", "knn_top5"}
_RUN_FILES = {"run.json", "train_summary.json"}
# Columns of the evaluation table, in this order, where any result file has them (eval_*.json from
# selfsup eval, results.json from finetune / distill).
_RESULT_COLUMNS = ("top1", "top5", "protocol", "dataset", "split", "label_fraction", "num_labeled", "from_head_layer",
                   "teacher", "student", "num_train", "num_test", "feature_dim", "backbone_unchanged", "seconds")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:13px} img{max-width:100%;height:auto}
.muted{color:#777} img.small{min-width:min(100%,640px);image-rendering:pixelated}
"""


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str, cls: str | None = None) -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img src="{_png_data_uri(data)}" alt="{html.escape(alt)}"{klass}>'


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td{' class=num' if isinstance(v, (int, float)) else ''}>{_fmt(v)}</td></tr>"
                    for k, v in rows if v is not None)
    return f"<table>{cells}</table>"


def _series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric key of metrics.jsonl as (steps, values), the known ones first."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in _NOT_SERIES and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    first_seen = {k: i for i, k in enumerate(keys)}
    known = list(_KNOWN_SERIES)
    keys.sort(key=lambda k: (known.index(k) if k in known else len(known), first_seen[k]))
    out = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and "step" in r and isinstance(r[k], (int, float))]
        if pts:
            out[k] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def curve_png(series: dict[str, tuple[list[float], list[float]]], columns: int = 3) -> bytes | None:
    """A PNG with one small plot per series against the step, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    if not series:
        return None
    n = len(series)
    cols = min(columns, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), dpi=90, squeeze=False)
    for ax, (key, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(_KNOWN_SERIES.get(key, key))
        ax.set_xlabel("step")
        if len(set(steps)) == 1:
            ax.set_xticks(sorted(set(steps)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _result_files(run_dir: Path) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(run_dir.glob("*.json")):
        if path.name in _RUN_FILES:
            continue
        data = _read_json(path)
        if "top1" in data:
            found.append((path.stem, data))
    return found


def _pictures(run_dir: Path) -> list[tuple[str, bytes]]:
    """PNG files in the run folder besides the two this page draws itself."""
    out = []
    for path in sorted(run_dir.glob("*.png")):
        if path.name in ("views.png", "loss.png"):
            continue
        data = path.read_bytes()
        if data.startswith(_PNG_MAGIC):
            out.append((path.name, data))
    return out


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def render_html_report(run_dir: str | Path) -> str:
    """The report page of ``run_dir`` as one HTML string."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"report: {run_dir} is not a folder; give a run folder written by selfsup pretrain")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"report: {run_dir} has no config.yaml; is it a selfsup run folder?")
    config_text = (run_dir / "config.yaml").read_text()
    try:
        import yaml

        config = yaml.safe_load(config_text) or {}
    except Exception:
        config = {}
    info = _read_json(run_dir / "run.json")
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    results = _result_files(run_dir)
    title = f"selfsup run {run_dir.resolve().name}"
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts += _summary_section(run_dir, config, info, train)
    parts += _evaluation_section(results)
    parts += _curves_section(rows)
    parts += _pictures_section(run_dir)
    parts += _timing_section(train, _read_json(run_dir / "train_summary.json"), results)
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>", "</body></html>"]
    return "\n".join(parts)


def _summary_section(run_dir: Path, config: dict, info: dict, train: list[dict]) -> list[str]:
    total = info.get("total_steps")
    per_epoch = info.get("steps_per_epoch")
    epochs = total / per_epoch if total and per_epoch else None
    last = train[-1] if train else {}
    return ["<h2>Summary</h2>", _table([
        ("method", config.get("method")),
        ("backbone", None if not config.get("backbone") else
         f"{config['backbone']}" + (f" (width x{config['backbone_width']:g})" if config.get("backbone_width") else "")),
        ("data set", config.get("dataset")),
        ("images", info.get("num_images")), ("image size", info.get("image_size")),
        ("channels", info.get("in_channels")), ("batch size", config.get("batch_size")),
        ("steps", f"{last.get('step', 0)} of {total}" if total else None),
        ("epochs", round(epochs, 3) if epochs is not None else None),
        ("final loss", last.get("loss")), ("device", info.get("device")), ("precision", info.get("precision")),
        ("processes", info.get("world_size")), ("seed", config.get("seed")),
        ("finished", "yes" if (run_dir / "model.safetensors").is_file() else "no (no model.safetensors yet)"),
    ])]


def _evaluation_section(results: list[tuple[str, dict]]) -> list[str]:
    parts = ["<h2>Evaluation</h2>"]
    if results:
        keys = [k for k in _RESULT_COLUMNS if any(k in data for _, data in results)]
        head = "".join(f"<th>{k}</th>" for k in ["file"] + keys)
        body = ""
        for name, data in results:
            cells = "".join(f"<td{' class=num' if isinstance(data.get(k), (int, float)) else ''}>{_fmt(data.get(k, ''))}</td>"
                            for k in keys)
            body += f"<tr><td>{html.escape(name)}.json</td>{cells}</tr>"
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    else:
        parts.append("<p class=muted>No evaluation results yet: run <code>selfsup eval knn --run RUN_DIR</code> or "
                     "<code>selfsup eval linear --run RUN_DIR</code>.</p>")
    return parts


def _curves_section(rows: list[dict]) -> list[str]:
    parts = ["<h2>Training curves</h2>"]
    series = _series(rows)
    png = curve_png(series)
    if png is not None:
        parts.append(_img(png, "training curves: " + ", ".join(series)))
    elif series:
        parts.append("<p class=muted>Install matplotlib (pip install 'selfsup[viz]') to draw the curves; last values:</p>")
        parts.append(_table([(k, v[-1][-1]) for k, v in series.items()]))
    else:
        parts.append("<p class=muted>metrics.jsonl is empty or missing.</p>")
    return parts


def _pictures_section(run_dir: Path) -> list[str]:
    parts = []
    if (run_dir / "views.png").is_file() and (run_dir / "views.png").read_bytes().startswith(_PNG_MAGIC):
        parts += ["<h2>Augmented views</h2>",
                  "<p>First column: the image as loaded; then views drawn from the two view distributions.</p>",
                  _img((run_dir / "views.png").read_bytes(), "augmented views", "small")]
    pictures = _pictures(run_dir)
    if pictures:
        parts.append("<h2>Other figures</h2>")
        for name, data in pictures:
            parts += [f"<h3>{html.escape(name)}</h3>", _img(data, name)]
    return parts


def _timing_section(train: list[dict], summary: dict, results: list[tuple[str, dict]]) -> list[str]:
    last = train[-1] if train else {}
    ips = sorted(r["images_per_sec"] for r in train[1:] if "images_per_sec" in r) or \
        [r["images_per_sec"] for r in train if "images_per_sec" in r]
    steps_done = last.get("step")
    elapsed = last.get("elapsed_sec")
    eval_seconds = sum(float(d.get("seconds", 0) or 0) for _, d in results) or None
    return ["<h2>Timing</h2>", _table([
        ("training time (logged)", _duration(elapsed)),
        ("training time (last session)", _duration(summary.get("train_seconds_this_session"))),
        ("seconds per step", round(elapsed / steps_done, 4) if elapsed and steps_done else None),
        ("median images / s (two views each)", round(ips[len(ips) // 2], 1) if ips else None),
        ("evaluation time", _duration(eval_seconds)),
    ])]


def write_html_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page to ``out`` (default ``RUN_DIR/report.html``) and return its path."""
    text = render_html_report(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
