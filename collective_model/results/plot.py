"""The results figure: accuracy against parameters with the frontier, and efficiency against accuracy.

It uses matplotlib's object API with the Agg canvas, never pyplot, so it works without a display
and leaves pyplot's global state alone.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .analysis import STANDALONE, Analysis
from .frontier import format_params
from .sources import ResultRun

STANDALONE_COLOR = "0.6"  # grey
FRONTIER_COLOR = "black"


def sweep_colors(analysis: Analysis) -> dict[str, str]:
    """Return a colour per sweep label from matplotlib's tab10 cycle, skipping its grey."""
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in range(10) if i != 7]
    colors = {}
    for index, sweep in enumerate(analysis.sweeps):
        colors[analysis.sweep_labels[sweep.sweep_id]] = palette[index % len(palette)]
    colors[STANDALONE] = STANDALONE_COLOR
    return colors


def write_plot(analysis: Analysis, path: str | Path) -> Path:
    """Draw the two panels and save them to ``path`` (the format follows its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 6), layout="constrained")
    FigureCanvasAgg(figure)
    size_axes, efficiency_axes = figure.subplots(1, 2)
    colors = sweep_colors(analysis)

    _draw_size_panel(size_axes, analysis, colors)
    _draw_efficiency_panel(efficiency_axes, analysis, colors)

    excluded = sum(analysis.excluded.values())
    figure.suptitle(
        f"{analysis.project}: {len(analysis.runs)} runs analysed of {analysis.runs_total} "
        f"({excluded} excluded), {len(analysis.sweeps)} sweeps, {len(analysis.frontier)} on the frontier"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _scatter_by_sweep(axes, analysis: Analysis, colors: dict, x_of, y_of) -> None:
    groups: dict[str, list[ResultRun]] = {}
    for run in analysis.runs:
        groups.setdefault(analysis.sweep_label(run), []).append(run)
    # Sweeps in their creation order, then standalone runs (the order of ``colors``).
    order = [label for label in colors if label in groups]
    order += [label for label in groups if label not in colors]
    for label in order:
        runs = groups[label]
        axes.scatter(
            [x_of(r) for r in runs],
            [y_of(r) for r in runs],
            s=28,
            color=colors.get(label, STANDALONE_COLOR),
            alpha=0.8,
            label=f"{label} ({len(runs)})",
            zorder=3,
        )


def _draw_size_panel(axes, analysis: Analysis, colors: dict) -> None:
    _scatter_by_sweep(axes, analysis, colors, lambda r: r.model_params, lambda r: r.test_accuracy)

    # The frontier as a step line: the best accuracy reachable with at most x parameters.
    if analysis.frontier:
        xs = [run.model_params for run in analysis.frontier]
        ys = [run.test_accuracy for run in analysis.frontier]
        axes.step(xs, ys, where="post", color=FRONTIER_COLOR, linewidth=1.4, label="Pareto frontier", zorder=2)
        axes.scatter(xs, ys, s=70, facecolors="none", edgecolors=FRONTIER_COLOR, linewidths=1.2, zorder=4)

    if analysis.max_params is not None:
        axes.axvline(analysis.max_params, color="tab:red", linestyle="--", linewidth=1, label=f"max params {format_params(analysis.max_params)}")
    if analysis.min_accuracy is not None:
        axes.axhline(analysis.min_accuracy, color="tab:red", linestyle=":", linewidth=1, label=f"min accuracy {analysis.min_accuracy:g} %")

    axes.set_xscale("log")
    # Ticks at 1, 2 and 5 of each decade, labelled as 200K or 1.5M instead of powers of ten.
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_params(int(round(value)))))
    axes.xaxis.set_minor_formatter(NullFormatter())
    _annotate(axes, analysis, lambda r: r.model_params, lambda r: r.test_accuracy, direction=(-1, 1))
    axes.set_xlabel("model_params (trainable parameters, log scale)")
    axes.set_ylabel("final/test_accuracy (%)")
    axes.set_title("Test accuracy against model size")
    axes.grid(True, which="both", alpha=0.3)
    if analysis.runs:
        axes.legend(loc="best", fontsize="small")


def _draw_efficiency_panel(axes, analysis: Analysis, colors: dict) -> None:
    _scatter_by_sweep(axes, analysis, colors, lambda r: r.test_accuracy, lambda r: r.efficiency)
    if analysis.frontier:
        axes.scatter(
            [r.test_accuracy for r in analysis.frontier],
            [r.efficiency for r in analysis.frontier],
            s=70,
            facecolors="none",
            edgecolors=FRONTIER_COLOR,
            linewidths=1.2,
            label="on the frontier",
            zorder=4,
        )
    # Efficiency spans orders of magnitude when model sizes do, so a log axis keeps points apart.
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    _annotate(axes, analysis, lambda r: r.test_accuracy, lambda r: r.efficiency, direction=(1, 1))
    axes.set_xlabel("final/test_accuracy (%)")
    axes.set_ylabel("test accuracy per 100K parameters (log scale)")
    axes.set_title("Parameter efficiency against test accuracy")
    axes.grid(True, which="both", alpha=0.3)
    if analysis.runs:
        axes.legend(loc="best", fontsize="small")


def _annotate(axes, analysis: Analysis, x_of, y_of, direction: tuple[int, int]) -> None:
    """Label each sweep's best run and the constrained choice, with one label per run.

    ``direction`` (x and y sign) points to the side of the frontier where no run can be, because
    any run there would dominate a frontier run. A label near an edge of the axes points inwards
    instead, and each further label moves a little further out, so labels overlap less.
    """
    labels: dict[int, list[str]] = {}
    runs: dict[int, ResultRun] = {}
    for winner in analysis.winners:
        if winner.run is not None:
            name = analysis.sweep_labels.get(winner.sweep.sweep_id, winner.sweep.name)
            labels.setdefault(id(winner.run), []).append(f"best {name}")
            runs[id(winner.run)] = winner.run
    if analysis.choice is not None:
        labels.setdefault(id(analysis.choice), []).append("choice")
        runs[id(analysis.choice)] = analysis.choice

    axes.autoscale_view()
    data_to_axes = axes.transData + axes.transAxes.inverted()
    for index, (key, texts) in enumerate(labels.items()):
        run = runs[key]
        point = (x_of(run), y_of(run))
        fx, fy = data_to_axes.transform(point)
        x_sign, y_sign = direction
        if (x_sign > 0 and fx > 0.75) or (x_sign < 0 and fx < 0.25):
            x_sign = -x_sign
        if (y_sign > 0 and fy > 0.8) or (y_sign < 0 and fy < 0.2):
            y_sign = -y_sign
        distance = 16 + 8 * index
        dx = x_sign * distance
        dy = y_sign * (distance + 10)
        color = "tab:red" if "choice" in texts else "black"
        axes.annotate(
            " / ".join(texts) + f"\n{run.run_id}: {run.test_accuracy:.2f} %, {format_params(run.model_params)}",
            xy=point,
            xytext=(dx, dy),
            textcoords="offset points",
            ha="right" if dx < 0 else "left",
            va="top" if dy < 0 else "bottom",
            fontsize="small",
            color=color,
            arrowprops={"arrowstyle": "->", "color": "tab:red" if color == "tab:red" else "0.3", "linewidth": 0.8},
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"},
            # Above the frontier line but below the points, so a label never hides a run.
            zorder=2.5,
        )
