"""Render an Analysis as a text report, CSV or JSON.

The three formats list the same runs: the Pareto frontier, smallest first, then any sweep winner
or constrained choice that is not on it (``Analysis.listed_runs``).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from .analysis import Analysis, Winner, describe_excluded
from .frontier import format_params
from .sources import ResultRun

# Columns of the CSV output and keys of each JSON run, before the changing hyperparameters.
ROW_FIELDS = (
    "run_id",
    "sweep",
    "sweep_id",
    "test_accuracy",
    "model_params",
    "param_efficiency",
    "on_frontier",
    "frontier_rank",
    "best_in_sweep",
    "chosen",
    "run_dir",
)


def reload_command(run_dir: str) -> str:
    """Return the shell command that reloads a run folder's model.

    >>> print(reload_command("/runs/abc"))
    python -c "import collective_model; m = collective_model.load_model('/runs/abc')"
    """
    return f'python -c "import collective_model; m = collective_model.load_model({run_dir!r})"'


# --------------------------------------------------------------------------------------------
# Rows shared by all formats
# --------------------------------------------------------------------------------------------


def run_rows(analysis: Analysis) -> list[dict[str, Any]]:
    """Return one dict per listed run with ROW_FIELDS and ``config.<key>`` for each changing key."""
    ranks = {id(run): rank for rank, run in enumerate(analysis.frontier, start=1)}
    winners = {id(w.run) for w in analysis.winners if w.run is not None}
    rows = []
    for run in analysis.listed_runs():
        row = {
            "run_id": run.run_id,
            "sweep": analysis.sweep_label(run),
            "sweep_id": run.sweep_id,
            "test_accuracy": run.test_accuracy,
            "model_params": run.model_params,
            "param_efficiency": run.efficiency,
            "on_frontier": id(run) in ranks,
            "frontier_rank": ranks.get(id(run)),
            "best_in_sweep": id(run) in winners,
            "chosen": run is analysis.choice,
            "run_dir": run.run_dir,
        }
        for key in analysis.frontier_keys:
            row[f"config.{key}"] = run.config.get(key)
        rows.append(row)
    return rows


def render_csv(analysis: Analysis) -> str:
    """Return the listed runs as CSV; lists, booleans and nulls of the config are JSON-encoded."""
    rows = run_rows(analysis)
    fields = list(ROW_FIELDS) + [f"config.{key}" for key in analysis.frontier_keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_cell(key, value) for key, value in row.items()})
    return buffer.getvalue()


def _csv_cell(key: str, value: Any) -> Any:
    if key.startswith("config."):
        return value if isinstance(value, str) else json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def render_json(analysis: Analysis) -> str:
    """Return the whole analysis as one JSON document (each listed run with its full config)."""
    runs = []
    by_id = {run.run_id: run for run in analysis.listed_runs()}
    for row in run_rows(analysis):
        entry = {key: row[key] for key in ROW_FIELDS}
        entry["config"] = by_id[row["run_id"]].config
        runs.append(entry)

    document = {
        "project": analysis.project,
        "backend": analysis.backend,
        "location": analysis.location,
        "runs_total": analysis.runs_total,
        "runs_analysed": len(analysis.runs),
        "excluded": dict(sorted(analysis.excluded.items())),
        "best_per_sweep": [_winner_json(analysis, w) for w in analysis.winners],
        "tradeoffs": [
            {
                "reference_run_id": t.reference.run.run_id,
                "run_id": t.other.run.run_id,
                "accuracy_points": t.accuracy_points,
                "params_change_percent": t.params_change_percent,
                "text": t.text,
            }
            for t in analysis.tradeoffs
        ],
        "frontier": [run.run_id for run in analysis.frontier],
        "frontier_hyperparameters": analysis.frontier_keys,
        "constraints": {"max_params": analysis.max_params, "min_accuracy": analysis.min_accuracy},
        "choice": _choice_json(analysis.choice),
        "max_accuracy_choice": _choice_json(analysis.max_accuracy_choice),
        "choice_message": none_qualifies_message(analysis) if analysis.constrained and analysis.choice is None else None,
        "runs": runs,
    }
    return json.dumps(document, indent=2) + "\n"


def _winner_json(analysis: Analysis, winner: Winner) -> dict[str, Any]:
    return {
        "sweep_id": winner.sweep.sweep_id,
        "sweep": analysis.sweep_labels.get(winner.sweep.sweep_id, winner.sweep.name),
        "metric": winner.metric,
        "goal": winner.goal,
        "ranked_by_fallback": winner.fallback,
        "run_id": winner.run.run_id if winner.run else None,
        "value": winner.value,
    }


def _choice_json(run: ResultRun | None) -> dict[str, Any] | None:
    if run is None:
        return None
    checkpoint = run.checkpoint_path
    return {
        "run_id": run.run_id,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_exists": bool(checkpoint and checkpoint.is_file()),
        "reload_command": reload_command(run.model_path) if run.model_path else None,
    }


# --------------------------------------------------------------------------------------------
# Text report
# --------------------------------------------------------------------------------------------


def render_table(analysis: Analysis) -> str:
    """Return the human-readable report: header, winners, trade-offs, frontier and choice."""
    sections = [_header(analysis), _winners_section(analysis), _frontier_section(analysis)]
    if analysis.constrained:
        sections.append(_choice_section(analysis))
    return "\n\n".join(section for section in sections if section) + "\n"


def _header(analysis: Analysis) -> str:
    where = f"local store {analysis.location}" if analysis.backend == "local" else f"W&B {analysis.location}"
    lines = [
        f"Project {analysis.project} ({where}): {analysis.runs_total} runs, "
        f"{len(analysis.runs)} analysed, {len(analysis.sweeps)} sweeps."
    ]
    excluded = describe_excluded(analysis)
    if excluded:
        lines.append(excluded)
    return "\n".join(lines)


def _winners_section(analysis: Analysis) -> str:
    if not analysis.winners:
        return "Best run of each sweep: no sweeps in scope (standalone runs only)."
    header = ("sweep", "sweep id", "metric", "best", "run", "test acc %", "params", "acc/100K")
    rows = []
    notes = []
    for winner in analysis.winners:
        label = analysis.sweep_labels.get(winner.sweep.sweep_id, winner.sweep.name)
        metric = f"{winner.metric} ({'max' if winner.goal == 'maximize' else 'min'})"
        if winner.fallback:
            notes.append(f"Sweep {label} names no metric and goal; its best run is ranked by {winner.metric}.")
        if winner.run is None:
            rows.append((label, winner.sweep.sweep_id, metric, "-", "no analysed run with this metric", "", "", ""))
            continue
        run = winner.run
        rows.append(
            (
                label,
                winner.sweep.sweep_id,
                metric,
                _metric_text(winner.value),
                run.run_id,
                f"{run.test_accuracy:.2f}",
                f"{run.model_params:,}",
                f"{run.efficiency:.2f}",
            )
        )
    lines = ["Best run of each sweep", *_align([header, *rows], right=(3, 5, 6, 7))]
    lines.extend(notes)
    for tradeoff in analysis.tradeoffs:
        other = analysis.sweep_labels.get(tradeoff.other.sweep.sweep_id, tradeoff.other.sweep.name)
        reference = analysis.sweep_labels.get(tradeoff.reference.sweep.sweep_id, tradeoff.reference.sweep.name)
        lines.append(
            f"Trade-off: {other}'s best ({tradeoff.other.run.run_id}) against {reference}'s best "
            f"({tradeoff.reference.run.run_id}): {tradeoff.text}."
        )
    return "\n".join(lines)


def _metric_text(value: float) -> str:
    """Return a metric value with two decimals, or four significant digits below 1 (losses)."""
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4g}"


def _frontier_section(analysis: Analysis) -> str:
    if not analysis.frontier:
        return "Pareto frontier: no analysed runs."
    header = ("#", "run", "sweep", "test acc %", "params", "acc/100K")
    rows = [
        (
            str(rank),
            run.run_id,
            analysis.sweep_label(run),
            f"{run.test_accuracy:.2f}",
            f"{run.model_params:,}",
            f"{run.efficiency:.2f}",
        )
        for rank, run in enumerate(analysis.frontier, start=1)
    ]
    count = len(analysis.frontier)
    lines = [
        f"Pareto frontier of test accuracy against parameters: {count} run{'s' if count != 1 else ''}, smallest first",
        *_align([header, *rows], right=(0, 3, 4, 5)),
    ]
    if analysis.frontier_keys:
        # One row per hyperparameter and one column per frontier run, numbered as above, because
        # a frontier is usually shorter than the list of keys that change along it.
        lines.append("Hyperparameters that change along the frontier (\"-\": not in the run's config):")
        ranks = tuple(f"#{rank}" for rank in range(1, count + 1))
        settings = [
            (key, *(_config_text(run.config.get(key, _MISSING)) for run in analysis.frontier))
            for key in analysis.frontier_keys
        ]
        lines.extend(_align([("hyperparameter", *ranks), *settings]))
    elif count > 1:
        lines.append("The frontier runs share every hyperparameter.")
    return "\n".join(lines)


_MISSING = object()


def _config_text(value: Any) -> str:
    """Return a config value for the text report: floats to 4 significant digits, lists as JSON."""
    if value is _MISSING:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        text = f"{value:.4g}"
        # Keep a float recognisable as one: 1.0 stays "1.0", not "1".
        return text if any(mark in text for mark in ".einf") else text + ".0"
    return json.dumps(value)


def constraint_text(analysis: Analysis) -> str:
    """Return the constraints in words, as in 'at most 500,000 parameters'."""
    parts = []
    if analysis.max_params is not None:
        parts.append(f"at most {analysis.max_params:,} parameters")
    if analysis.min_accuracy is not None:
        parts.append(f"at least {analysis.min_accuracy:g} % test accuracy")
    return " and ".join(parts)


def _choice_section(analysis: Analysis) -> str:
    if analysis.choice is None:
        return none_qualifies_message(analysis)
    both = analysis.max_params is not None and analysis.min_accuracy is not None
    if both:
        title = f"Deployment choice ({constraint_text(analysis)}): the smallest run that meets both"
    elif analysis.max_params is not None:
        title = f"Deployment choice ({constraint_text(analysis)}): the most accurate run within the limit"
    else:
        title = f"Deployment choice ({constraint_text(analysis)}): the smallest run that reaches it"
    lines = [title, *_choice_lines(analysis, analysis.choice)]
    if analysis.max_accuracy_choice is not None:
        lines.append("The most accurate run that meets both:")
        lines.extend(_choice_lines(analysis, analysis.max_accuracy_choice))
    return "\n".join(lines)


def _choice_lines(analysis: Analysis, run: ResultRun) -> list[str]:
    lines = [
        f"  run:        {run.run_id} ({analysis.sweep_label(run)}), {run.test_accuracy:.2f} % test accuracy, "
        f"{run.model_params:,} parameters ({format_params(run.model_params)}), {run.efficiency:.2f} per 100K"
    ]
    checkpoint = run.checkpoint_path
    if checkpoint is None:
        lines.append("  checkpoint: unknown (the run record names no run folder)")
        return lines
    missing = "" if checkpoint.is_file() else " (not found on this machine)"
    lines.append(f"  checkpoint: {checkpoint}{missing}")
    lines.append(f"  reload:     {reload_command(run.model_path)}")
    lines.append(f"  export:     collective results export {run.run_id} DIR")
    return lines


def none_qualifies_message(analysis: Analysis) -> str:
    """Return why no run meets the constraints, with the closest the analysed runs come."""
    prefix = f"No analysed run meets the constraints ({constraint_text(analysis)})"
    if not analysis.runs:
        return prefix + "."
    smallest = min(run.model_params for run in analysis.runs)
    within = [run for run in analysis.runs if analysis.max_params is None or run.model_params <= analysis.max_params]
    if not within:
        return f"{prefix}: the smallest analysed run has {smallest:,} parameters."
    best = max(run.test_accuracy for run in within)
    if analysis.max_params is None:
        return f"{prefix}: the most accurate analysed run reaches {best:.2f} %."
    return f"{prefix}: the most accurate run with at most {analysis.max_params:,} parameters reaches {best:.2f} %."


def _align(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """Return rows as lines of columns two spaces apart, indented by two.

    Columns whose index is in ``right`` (numbers) are right-aligned, the others left-aligned.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if i in right else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines
