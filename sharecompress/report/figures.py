"""The report's figures (PNG) and a self-contained HTML page: what compression cost, at a glance.

matplotlib is an optional extra, imported only here and only when a figure is drawn, through
its object-oriented API with the Agg canvas: no pyplot, no global backend switch, no display.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import os
import math
import re
import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ShareError
from .report import human_bytes
from ..store.storage import staged_file, write_bytes_durably

PLOT_INCHES = (12.0, 11.0)
PLOT_DPI = 100
PLOT_PIXELS = (int(PLOT_INCHES[0] * PLOT_DPI), int(PLOT_INCHES[1] * PLOT_DPI))  # (width, height)
MAX_LABELLED_BARS = 40  # beyond this, names cannot be read: a sorted error profile instead
MAX_GROUPS = 10  # more lines than this is a tangle: group by shape instead
NOTE_WORST = 5  # adapters listed by name on the sorted profile
COLOR_EXACT, COLOR_BOUND, COLOR_OVER = "#3b6fb6", "#e3a33b", "#c8372d"
INSTALL_HINT = "pip install 'sharecompress[plot]'"


class PlotUnavailable(ShareError):
    """matplotlib is not installed: figures cannot be drawn, everything else still works."""


class TargetError(ShareError):
    """An output file that cannot be written where the user asked."""


# ----------------------------------------------------------------------------- output files


def check_target(path: Path, flag: str, zoo: Path | None = None) -> Path:
    """Refuse before any work: a missing parent directory, a directory in the way, a path in the zoo."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise TargetError(f"{flag} {path}: directory {parent} does not exist")
    if path.is_dir():
        raise TargetError(f"{flag} {path}: is a directory")
    if zoo is not None:
        real_zoo = Path(os.path.realpath(zoo))
        if real_zoo == Path(os.path.realpath(parent)) or real_zoo in Path(os.path.realpath(parent)).parents:
            raise TargetError(f"{flag} {path}: lies inside the zoo {zoo}; write it somewhere else")
    return path


def write_file_atomically(path: Path, data: bytes) -> None:
    """Through ``storage.staged_file``: never a half-written file; an OSError is one line."""
    try:
        with staged_file(Path(path)) as temp:
            write_bytes_durably(temp, data)
    except OSError as exc:  # full disk, no permission: the user's to fix, in one line
        raise TargetError(f"{path}: cannot write: {exc.strerror or exc}") from None


def check_outputs(plot: Path | None, html_to: Path | None, zoo: Path | None = None) -> None:
    """Everything that can refuse, before any work: missing directories, the zoo itself, missing matplotlib."""
    for path, flag in ((plot, "--plot"), (html_to, "--html")):
        if path is not None:
            check_target(path, flag, zoo)
    if plot is not None and html_to is not None and Path(plot).resolve() == Path(html_to).resolve():
        raise TargetError(f"--plot and --html name the same file {plot}")
    if plot is not None:
        load_matplotlib()


def write_outputs(report: dict, manifest: dict, max_error: float | None = None, *, plot: Path | None = None,
                  html_to: Path | None = None, title: str = "sharecompress report", zoo: Path | None = None) -> list[str]:
    """Write the requested files, each atomically; returns lines for the user (stderr)."""
    check_outputs(plot, html_to, zoo)
    lines = []
    if plot is not None:
        write_file_atomically(plot, report_image(report, manifest, max_error, plot_format(plot)))
        lines.append(f"wrote plot {plot}")
    if html_to is not None:
        write_file_atomically(html_to, report_html(report, manifest, max_error, title).encode("utf-8"))
        lines.append(f"wrote page {html_to}")
        if not has_matplotlib():
            lines.append(f"note: the page has the tables but no figures; figures need matplotlib: {INSTALL_HINT}")
    return lines


def has_matplotlib() -> bool:
    try:
        load_matplotlib()
    except PlotUnavailable:
        return False
    return True


# ----------------------------------------------------------------------------- matplotlib


def load_matplotlib(flag: str = "report --plot") -> Any:
    """matplotlib's Figure class, or one clear line saying how to install it."""
    try:
        importlib.import_module("matplotlib")
        return importlib.import_module("matplotlib.figure").Figure
    except ImportError:
        raise PlotUnavailable(f"{flag} needs matplotlib: {INSTALL_HINT}") from None


def _png(fig: Any, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=PLOT_DPI)
    return buf.getvalue()


def plot_format(path: Path) -> str:
    """SVG or PDF when the name asks for it (matplotlib writes both natively), else PNG."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in ("svg", "pdf") else "png"


def report_image(report: dict, manifest: dict, max_error: float | None = None, fmt: str = "png") -> bytes:
    """Both figures stacked in one image (a PNG of exactly PLOT_PIXELS): energy above, errors below."""
    Figure = load_matplotlib()
    fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": (1, 1.15)})  # kwarg form works on 3.5
    draw_energy(top, manifest)
    draw_errors(bottom, report, max_error)
    fig.suptitle(_headline(report), fontsize=13, fontweight="bold")
    return _png(fig, fmt)


def single_png(kind: str, report: dict, manifest: dict, max_error: float | None = None) -> bytes:
    """One figure alone (for the HTML page, where each sits beside its own text)."""
    Figure = load_matplotlib("report --html figures")
    height = 5.0 if kind == "energy" else _errors_height(len(report["adapters"]))
    fig = Figure(figsize=(11.0, height), dpi=PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    if kind == "energy":
        draw_energy(ax, manifest)
    else:
        draw_errors(ax, report, max_error)
    return _png(fig)


def _errors_height(count: int) -> float:
    """Labelled bars need room per name; the sorted profile does not."""
    return min(max(3.0, 1.2 + 0.22 * count), 10.0) if count <= MAX_LABELLED_BARS else 4.5


def _headline(report: dict) -> str:
    return (
        f"sharecompress: {len(report['adapters'])} adapters, {len(report['modules'])} modules — "
        f"relative error {report['relative_error']:.4g}, "
        f"{report['compression_ratio']:.1f}× smaller (all-in)"
    )


# ----------------------------------------------------------------------------- figure 1: energy


def module_groups(modules: dict) -> dict[str, list[str]]:
    """Modules that play the same role, so one line stands for many layers.

    The key is the last non-numeric name component (``query``, ``q_proj``), split by shape when
    one role has several; with too many roles, by shape alone.
    """
    def role(name: str) -> str:
        parts = [p for p in name.split(".") if not p.isdigit()]
        return parts[-1] if parts else name

    def shape(name: str) -> str:
        return "×".join(map(str, modules[name]["shape"]))

    by_role: dict[str, list[str]] = defaultdict(list)
    for name in modules:
        by_role[role(name)].append(name)
    groups: dict[str, list[str]] = {}
    for key, names in by_role.items():
        shapes = {shape(n) for n in names}
        for n in names:
            groups.setdefault(f"{key} {shape(n)}" if len(shapes) > 1 else key, []).append(n)
    if len(groups) > MAX_GROUPS:
        groups = defaultdict(list)
        for name in modules:
            groups[f"shape {shape(name)}"].append(name)
    return dict(sorted(groups.items(), key=lambda kv: _natural(kv[0])))


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _padded(curve: list[float], length: int) -> list[float]:
    """A curve that reached the whole stack stays at 1; a truncated one is unknown beyond its end."""
    tail = 1.0 if curve and curve[-1] >= 1.0 - 1e-6 else math.nan
    return list(curve) + [tail] * (length - len(curve))


def group_band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Median, min and max across curves at each k (ignoring modules whose curve stopped)."""
    length = max(len(c) for c in curves)
    columns = zip(*(_padded(c, length) for c in curves))
    med, lo, hi = [], [], []
    for col in columns:
        known = [v for v in col if not math.isnan(v)]
        med.append(statistics.median(known) if known else math.nan)
        lo.append(min(known) if known else math.nan)
        hi.append(max(known) if known else math.nan)
    return med, lo, hi


def draw_energy(ax: Any, manifest: dict) -> None:
    """Energy kept vs k: each group's median, its min–max band, and the k each module got."""
    modules = manifest["modules"]
    groups = module_groups(modules)
    styles = ["-", "--", "-.", ":"]
    for i, (color, (label, names)) in enumerate(zip(_palette(len(groups)), groups.items())):
        curves = [modules[n]["energy_curve"] for n in names if modules[n].get("energy_curve")]
        if not curves:
            continue
        med, lo, hi = (_clip(c) for c in group_band(curves))
        ks = list(range(1, len(med) + 1))
        if len(curves) > 1:
            ax.fill_between(ks, lo, hi, color=color, alpha=0.18, linewidth=0)
        ax.plot(ks, med, color=color, linewidth=2, linestyle=styles[i % len(styles)],  # overlaps stay visible
                label=_group_label(label, names, modules))
        _mark_k(ax, [modules[n] for n in names], color)
    target = (manifest.get("k_rule") or {}).get("energy")
    if target:
        ax.axhline(target, color="0.35", linestyle=":", linewidth=1.2, label=f"energy target {target:.4g}")
    _nines_axis(ax, _nines_top(modules, target))
    ax.set_xlim(left=0)
    ax.set_xlabel("k: shared directions per module (left basis U)")
    ax.set_ylabel("share of the adapters' update energy")
    ax.set_title("Energy kept vs k — line: median of the group's modules; band: min–max; ● each module's k",
                 fontsize=11, loc="left")
    ax.text(0.99, 0.02, "curves: energy in the top-k left directions;\n"
            "'kept' in the legend: what the stored U, V and cores keep",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.35")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)


NINES_FLOOR = 1e-4  # 99.99 %: the top of the energy axis


def _clip(values: list[float]) -> list[float]:
    return [min(v, 1.0 - NINES_FLOOR) for v in values]


NINES_TICKS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999]


def _nines_top(modules: dict, target: float | None) -> float:
    """The lowest tick above every curve and the target: no empty band of nines nobody reached."""
    highest = max([max(m["energy_curve"]) for m in modules.values() if m.get("energy_curve")] + [target or 0.0])
    return next((t for t in NINES_TICKS[4:] if t >= highest), NINES_TICKS[-1])


def _nines_axis(ax: Any, top: float) -> None:
    """y as −log10(1 − kept): 90 %, 99 %, 99.9 % equally spaced, where the choice of k is made."""
    ticker = importlib.import_module("matplotlib.ticker")

    def forward(y: Any) -> Any:
        import numpy as np

        return -np.log10(np.clip(1.0 - np.asarray(y, dtype=float), NINES_FLOOR, None))

    def inverse(t: Any) -> Any:
        import numpy as np

        return 1.0 - 10.0 ** (-np.asarray(t, dtype=float))

    ax.set_yscale("function", functions=(forward, inverse))
    ax.set_ylim(0.0, top)
    ax.yaxis.set_major_locator(ticker.FixedLocator([t for t in NINES_TICKS if t <= top]))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{100 * y:.4g}%"))


def _group_label(label: str, names: list[str], modules: dict) -> str:
    ks = sorted(modules[n]["k_u"] for n in names)
    k_text = f"k={ks[0]}" if ks[0] == ks[-1] else f"k {ks[0]}–{ks[-1]} (median {statistics.median(ks):g})"
    kept = [modules[n].get("energy_kept") for n in names if modules[n].get("energy_kept") is not None]
    kept_text = f", kept {statistics.median(kept):.2%}" if kept else ""
    return f"{label} — {len(names)} module{'s' if len(names) != 1 else ''}, {k_text}{kept_text}"


def _mark_k(ax: Any, entries: list[dict], color: str) -> None:
    """Each module's own (k, energy at k) on its own curve: where the cut fell, and its spread."""
    points = [(m["k_u"], m["energy_curve"][m["k_u"] - 1]) for m in entries
              if m.get("energy_curve") and 0 < m["k_u"] <= len(m["energy_curve"])]
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, _clip(list(ys)), s=36 if len(points) < 50 else 18, color=color, edgecolors="white",
                   linewidths=0.8, zorder=5, alpha=0.9)


def _palette(count: int) -> list[str]:
    base = ["#3b6fb6", "#d0573a", "#3f9e5a", "#8b5bb5", "#c99a1e", "#2aa6b0", "#c24f8f", "#6b6b6b",
            "#8c6239", "#1d3f73"]
    return [base[i % len(base)] for i in range(count)]


# ----------------------------------------------------------------------------- figure 2: errors


def draw_errors(ax: Any, report: dict, max_error: float | None = None) -> None:
    """Each adapter's relative error: labelled bars for a few, a sorted profile for many."""
    adapters = sorted(report["adapters"], key=lambda a: a["relative_error"])
    if not adapters:
        ax.text(0.5, 0.5, "no adapters", ha="center", va="center", transform=ax.transAxes)
        return
    if len(adapters) <= MAX_LABELLED_BARS:
        _error_bars(ax, adapters, max_error)
    else:
        _error_profile(ax, adapters, max_error)
    ax.set_title(_errors_title(report, max_error), fontsize=11, loc="left")


def _errors_title(report: dict, max_error: float | None) -> str:
    text = f"Relative error per adapter, ‖ΔW − ΔŴ‖ / ‖ΔW‖ (zoo: {report['relative_error']:.4g})"
    if max_error is not None:
        over = sum(a["relative_error"] > max_error for a in report["adapters"])
        text += f" — {over} above --max-error {max_error:g}"
    return text


def _over(a: dict, max_error: float | None) -> bool:
    return max_error is not None and a["relative_error"] > max_error


def _color(a: dict, max_error: float | None) -> str:
    """Red above the threshold; otherwise blue for exact errors, amber for bounds after add."""
    if _over(a, max_error):
        return COLOR_OVER
    return COLOR_EXACT if a["exact"] else COLOR_BOUND


def _error_bars(ax: Any, adapters: list[dict], max_error: float | None) -> None:
    """Horizontal bars, worst at the top, each named and valued; bounds hatched."""
    ys = range(len(adapters))
    errors = [a["relative_error"] for a in adapters]
    bars = ax.barh(ys, errors, color=[_color(a, max_error) for a in adapters], height=0.7)
    for bar, a in zip(bars, adapters):
        if not a["exact"]:
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    ax.set_yticks(list(ys), [a["name"] for a in adapters], fontsize=9 if len(adapters) <= 20 else 7)
    top = max(errors + [max_error or 0.0]) or 1.0
    for y, e, a in zip(ys, errors, adapters):
        ax.text(e + top * 0.01, y, f"{'' if a['exact'] else '≤ '}{e:.3g}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.12)
    ax.set_ylim(-0.6, len(adapters) - 0.4)
    ax.set_xlabel("relative error")
    ax.grid(True, axis="x", alpha=0.3)
    _threshold(ax, max_error, vertical=True)
    _error_legend(ax, adapters, max_error, loc="lower right", markers=False)


def _error_profile(ax: Any, adapters: list[dict], max_error: float | None) -> None:
    """Many adapters: errors sorted, one point each (▲ for bounds); the worst few listed."""
    errors = [a["relative_error"] for a in adapters]
    xs = list(range(1, len(adapters) + 1))
    ax.plot(xs, errors, color="0.7", linewidth=1, zorder=1)
    size = 14 if len(xs) > 300 else 24
    for exact, marker in ((True, "o"), (False, "^")):
        chosen = [(x, a) for x, a in zip(xs, adapters) if a["exact"] == exact]
        if chosen:
            ax.scatter([x for x, _ in chosen], [a["relative_error"] for _, a in chosen], marker=marker,
                       s=size if exact else size * 1.5,
                       c=[_color(a, max_error) for _, a in chosen], linewidths=0, zorder=2)
    med = statistics.median(errors)
    ax.axhline(med, color="0.35", linestyle="--", linewidth=1, label=f"median {med:.3g}")
    worst = adapters[::-1][:NOTE_WORST]
    ax.scatter(xs[::-1][: len(worst)], [a["relative_error"] for a in worst], s=90, facecolors="none",
               edgecolors="black", linewidths=1, zorder=3)
    listing = "\n".join(f"{a['name']}  {'' if a['exact'] else '≤ '}{a['relative_error']:.4g}" for a in worst)
    ax.text(0.98, 0.04, f"worst (circled):\n{listing}", transform=ax.transAxes, ha="right", va="bottom",
            multialignment="left", fontsize=8, family="monospace", bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7"})
    _profile_limits(ax, errors, max_error)
    ax.set_xlim(0, len(xs) + 1)
    ax.set_xlabel(f"adapters, sorted by error ({len(xs)})")
    ax.set_ylabel("relative error")
    ax.grid(True, alpha=0.3)
    _error_legend(ax, adapters, max_error, loc="upper left", markers=True)


def _profile_limits(ax: Any, errors: list[float], max_error: float | None) -> None:
    """Room for the data; the threshold joins the axis only when that does not flatten the data."""
    low, high = min(errors), max(errors)
    span = high - low or max(high * 0.1, 1e-3)
    if max_error is not None and low - span <= max_error <= high + span:
        low, high = min(low, max_error), max(high, max_error)
        _threshold(ax, max_error, vertical=False)
    elif max_error is not None:
        where = "below" if max_error < low else "above"
        ax.text(0.5, 0.02 if where == "below" else 0.95, f"--max-error {max_error:g} is {where} the axis",
                transform=ax.transAxes, ha="center", fontsize=9, color=COLOR_OVER)
    pad = (high - low) * 0.08 or span * 0.1
    ax.set_ylim(max(low - pad, 0.0), high + pad)


def _threshold(ax: Any, max_error: float | None, vertical: bool) -> None:
    if max_error is None:
        return
    line = ax.axvline if vertical else ax.axhline
    line(max_error, color=COLOR_OVER, linestyle="--", linewidth=1.5, label=f"--max-error {max_error:g}")


def _error_legend(ax: Any, adapters: list[dict], max_error: float | None, loc: str, markers: bool) -> None:
    """Only the kinds present: exact, bound after add, above the threshold (as patches or markers)."""
    patches = importlib.import_module("matplotlib.patches")
    lines = importlib.import_module("matplotlib.lines")

    def handle(color: str, bound: bool) -> Any:
        if markers:
            return lines.Line2D([], [], color=color, marker="^" if bound else "o", linestyle="none", markersize=7)
        return patches.Patch(facecolor=color, hatch="///" if bound else None, edgecolor="white")

    handles, labels = ax.get_legend_handles_labels()
    kinds = [
        (any(a["exact"] and not _over(a, max_error) for a in adapters), COLOR_EXACT, False, "exact error"),
        (any(not a["exact"] for a in adapters), COLOR_BOUND, True,
         f"upper bound after add, {'▲' if markers else 'hatched'} (report --against for exact)"),
        (any(_over(a, max_error) for a in adapters), COLOR_OVER, False, "above --max-error"),
    ]
    for present, color, bound, label in kinds:
        if present:
            handles.append(handle(color, bound))
            labels.append(label)
    ax.legend(handles, labels, loc=loc, fontsize=9, framealpha=0.9)


# ----------------------------------------------------------------------------- HTML page

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1150px;
 padding:0 1em;color:#1e1e1e;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.muted{color:#666}.note{background:#fff6e0;border-left:4px solid #e3a33b;padding:.6em 1em}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.25em 1.5em}dl.summary dt{color:#555}
dl.summary dd{margin:0;font-weight:600}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{padding:.25em .7em;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}td.name,th.name{text-align:left;white-space:normal;word-break:break-all}
tr.over td{background:#fbe5e3}tr.bound td.err{color:#9a6a12}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


def report_html(report: dict, manifest: dict, max_error: float | None = None, title: str = "sharecompress report") -> str:
    """One self-contained page: summary, figures (inline PNG) and tables; no URLs, no scripts.

    Without matplotlib the page still carries every number, with a note where figures would be.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>',
        _summary_html(report, max_error),
        _figures_html(report, manifest, max_error),
        _adapters_html(report, max_error),
        _modules_html(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _summary_html(report: dict, max_error: float | None) -> str:
    """The headline figures; each exact value is in the cell's title (hover) as --json prints it."""
    rows = [
        ("relative error (zoo)", f"{report['relative_error']:.4g}", repr(report["relative_error"])),
        ("energy kept", f"{report['energy_kept']:.4%}", repr(report["energy_kept"])),
        ("compression (all-in)", f"{report['compression_ratio']:.2f}×", repr(report["compression_ratio"])),
        ("compression (coefficients only)", f"{report['coefficient_ratio']:.2f}×", repr(report["coefficient_ratio"])),
        ("LoRA bytes", f"{human_bytes(report['bytes_original'])} → {human_bytes(report['bytes_compressed'])} "
                       f"(basis {human_bytes(report['bytes_basis'])} + coefficients {human_bytes(report['bytes_coefficients'])})", ""),
        ("adapters / modules", f"{len(report['adapters'])} / {len(report['modules'])}", ""),
        ("k per module (U)", _k_counts(report["modules"]), ""),
        ("method, stored as", f"{report.get('method')}, {report.get('dtype')}", ""),
        ("base model", str(report.get("base_model")), ""),
    ]
    if report.get("bytes_extras"):
        rows.append(("non-LoRA tensors (verbatim)", human_bytes(report["bytes_extras"]), ""))
    if max_error is not None:
        over = sum(a["relative_error"] > max_error for a in report["adapters"])
        rows.append((f"above --max-error {max_error:g}", str(over), ""))
    bounds = sum(not a["exact"] for a in report["adapters"])
    if bounds:
        rows.append(("errors that are bounds (after add)", f"{bounds} — report --against gives exact figures", ""))
    cells = "".join(f'<dt>{_e(k)}</dt><dd{_title(t)}>{_e(v)}</dd>' for k, v, t in rows)
    return f'<h2>Summary</h2><dl class="summary">{cells}</dl>'


def _k_counts(modules: dict) -> str:
    counts = Counter(m["k_u"] for m in modules.values())
    return ", ".join(f"k={k} ×{n}" for k, n in sorted(counts.items()))


def _class(names: str) -> str:
    return f' class="{names}"' if names else ""


def _title(text: str) -> str:
    return f' title="{_e(text)}"' if text else ""


def _figures_html(report: dict, manifest: dict, max_error: float | None) -> str:
    try:
        energy = single_png("energy", report, manifest, max_error)
        errors = single_png("errors", report, manifest, max_error)
    except PlotUnavailable:
        return (f'<h2>Figures</h2><p class="note">Figures need matplotlib, which is not installed: '
                f"<code>{_e(INSTALL_HINT)}</code>. The tables below hold every number.</p>")
    return (
        "<h2>Energy kept vs k</h2>"
        "<p>Share of the adapters' update energy Σσ² in the top-k shared directions of each module, "
        "modules grouped by role: the line is the group's median, the band its min–max, "
        "each dot one module's k; the legend's “kept” is what the stored bases and cores keep.</p>"
        + _img(energy, "energy kept versus k per module group")
        + "<h2>Relative error per adapter</h2>" + _img(errors, "relative error of each adapter")
    )


def _img(png: bytes, alt: str) -> str:
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></p>'


def _adapters_html(report: dict, max_error: float | None) -> str:
    """Worst first, as a reader hunts for trouble."""
    head = ("<tr><th class='name'>adapter</th><th>rank</th><th>p</th><th>relative error</th><th>exact</th>"
            "<th>worst module</th><th>error at merge</th><th>drift</th><th>original bytes</th></tr>")
    rows = []
    for a in sorted(report["adapters"], key=lambda a: -a["relative_error"]):
        cls = " ".join(c for c, on in (("over", max_error is not None and a["relative_error"] > max_error),
                                        ("bound", not a["exact"])) if on)
        rows.append(
            f'<tr{_class(cls)}><td class="name">{_e(a["name"])}</td><td>{_e(a["rank"])}</td><td>{_e(a["p"])}</td>'
            f'<td class="err" title="{_e(repr(a["relative_error"]))}">{a["relative_error"]:.4g}</td>'
            f'<td>{"yes" if a["exact"] else "bound"}</td><td>{a["max_module_error"]:.4g}</td>'
            f'<td>{a["merge_error"]:.4g}</td><td>{a["drift"]:.3g}</td><td>{_e(human_bytes(a["bytes_original"]))}</td></tr>'
        )
    return f"<h2>Adapters</h2><table>{head}{''.join(rows)}</table>"


def _modules_html(report: dict) -> str:
    """In a <details>: long for big models, and the figure already summarises it."""
    head = "<tr><th class='name'>module</th><th>shape</th><th>k (U)</th><th>k (V)</th><th>energy kept</th></tr>"
    rows = []
    for name, m in sorted(report["modules"].items(), key=lambda kv: _natural(kv[0])):
        kept = m.get("energy_kept")
        rows.append(
            f"<tr><td class='name'>{_e(name)}</td><td>{_e('×'.join(map(str, m['shape'])))}</td>"
            f"<td>{m['k_u']}</td><td>{m['k_v']}</td><td>{'' if kept is None else f'{kept:.4%}'}</td></tr>"
        )
    return (f"<h2>Modules</h2><details{' open' if len(rows) <= 50 else ''}><summary>{len(rows)} modules</summary>"
            f"<table>{head}{''.join(rows)}</table></details>")
