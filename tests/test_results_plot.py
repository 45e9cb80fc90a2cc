"""The results figure: what is drawn, and that odd run sets still produce a file."""

import matplotlib.figure
import pytest
from matplotlib.text import Annotation

from collective_model.results import analyse
from collective_model.results import plot as plot_module
from collective_model.results.sources import RunSet, SweepInfo, run_from_record

ACCURACY = SweepInfo("swacc001", "accuracy", "final/test_accuracy", "maximize")
EFFICIENCY = SweepInfo("sweff002", "efficiency", "final/param_efficiency", "maximize")


def record(run_id, accuracy, params, sweep=None, state="finished"):
    summary = {"final/test_accuracy": accuracy, "model_params": params}
    if sweep is EFFICIENCY:
        summary["final/param_efficiency"] = accuracy / params * 100_000
    return {"run_id": run_id, "project": "proj", "sweep_id": sweep.sweep_id if sweep else None, "sweep_name": sweep.name if sweep else None,
            "state": state, "config": {}, "summary": summary, "run_dir": None}


def analysis_of(records, sweeps=(ACCURACY, EFFICIENCY), **constraints):
    run_set = RunSet("proj", "local", "/tmp/s.db", [run_from_record(r) for r in records], list(sweeps))
    return analyse(run_set, **constraints)


@pytest.fixture
def captured_figure(monkeypatch):
    """Keep the last figure write_plot saves, to inspect what it drew."""
    figures = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def test_figure_contents(tmp_path, captured_figure):
    result = analysis_of(
        [
            record("a1", 88.0, 1_000_000, ACCURACY),
            record("a2", 90.0, 4_000_000, ACCURACY),
            record("e1", 85.0, 200_000, EFFICIENCY),
            record("s1", 86.0, 500_000),
            record("f1", 99.0, 100, ACCURACY, state="failed"),
        ],
        max_params=600_000,
    )
    path = plot_module.write_plot(result, tmp_path / "front.png")
    assert path.is_file()
    figure = captured_figure[-1]
    size_axes, efficiency_axes = figure.axes[:2]
    assert figure._suptitle.get_text() == "proj: 4 runs analysed of 5 (1 excluded), 2 sweeps, 4 on the frontier"
    assert size_axes.get_xscale() == "log"
    assert efficiency_axes.get_yscale() == "log"

    step = [line for line in size_axes.get_lines() if line.get_label() == "Pareto frontier"][0]
    assert list(step.get_xdata()) == [200_000, 500_000, 1_000_000, 4_000_000]
    assert list(step.get_ydata()) == [85.0, 86.0, 88.0, 90.0]

    legend = [text.get_text() for text in size_axes.get_legend().get_texts()]
    assert legend[:3] == ["accuracy (2)", "efficiency (1)", "standalone (1)"]
    standalone = [c for c in size_axes.collections if c.get_label() == "standalone (1)"][0]
    assert tuple(standalone.get_facecolor()[0][:3]) == pytest.approx((0.6, 0.6, 0.6))

    labels = sorted(child.get_text().split("\n")[0] for child in size_axes.get_children() if isinstance(child, Annotation))
    assert labels == ["best accuracy", "best efficiency", "choice"]


def test_choice_and_winner_share_a_label(tmp_path, captured_figure):
    result = analysis_of([record("a1", 88.0, 1_000, ACCURACY), record("e1", 85.0, 200, EFFICIENCY)], max_params=5_000)
    plot_module.write_plot(result, tmp_path / "front.png")
    labels = sorted(c.get_text().split("\n")[0] for c in captured_figure[-1].axes[0].get_children() if isinstance(c, Annotation))
    assert labels == ["best accuracy / choice", "best efficiency"]


@pytest.mark.parametrize(
    "records, sweeps, constraints",
    [
        ([record("only", 80.0, 5000)], (), {}),
        ([record("only", 80.0, 5000, ACCURACY)], (ACCURACY,), {"max_params": 10}),
        ([record("a", 80.0, 5000), record("b", 80.0, 5000)], (), {"min_accuracy": 50.0}),
        ([record(f"r{i}", 70.0 + i, 1000 * (i + 1), ACCURACY if i % 3 else None) for i in range(12)], (ACCURACY, EFFICIENCY), {"max_params": 6000, "min_accuracy": 72.0}),
    ],
)
def test_odd_run_sets_still_plot(tmp_path, records, sweeps, constraints):
    result = analysis_of(records, sweeps=sweeps, **constraints)
    path = plot_module.write_plot(result, tmp_path / "sub" / "front.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_many_sweeps_get_distinct_colours():
    sweeps = [SweepInfo(f"s{i:07d}", f"sweep{i}", "final/test_accuracy", "maximize") for i in range(12)]
    result = analysis_of([record("x", 80.0, 100, sweeps[0])], sweeps=sweeps)
    colors = plot_module.sweep_colors(result)
    assert len(colors) == 13
    assert colors["standalone"] == plot_module.STANDALONE_COLOR
    first_nine = [colors[f"sweep{i}"] for i in range(9)]
    assert len(set(first_nine)) == 9
