"""Sweep files: find, load, pin (``--set``) and validate a W&B sweep config.

A sweep file is a W&B sweep config, so the same file works with `wandb sweep`/`wandb agent` and
with the local backend. Validation collects every problem: violations of W&B's sweep schema (as
the ``sweeps`` package reports them), parameters that are not config keys, and parameter values
that `collective train` would reject.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from .. import config as config_lib
from ..errors import EXIT_USAGE, CollectiveError

SHIPPED_SWEEPS = ("accuracy", "efficiency")

# The command of the shipped files. `wandb agent` expands ${env} to /usr/bin/env; `collective
# train` reads the suggested config from WANDB_SWEEP_PARAM_PATH, so no ${args} are needed.
DEFAULT_COMMAND = ["${env}", "collective", "train"]

# Sweep config sections that only W&B's hosted service can run.
_WANDB_ONLY_SECTIONS = {
    "early_terminate": "early termination needs the W&B server's run history",
    "scheduler": "custom schedulers run through W&B Launch",
    "controller": "controllers belong to W&B's sweep service",
    "job": "Launch jobs run through W&B Launch",
    "image_uri": "container images run through W&B Launch",
}


class SweepSpecError(CollectiveError):
    """An invalid sweep file or --set option; ``problems`` lists every violation found."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid sweep config {source}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def shipped_sweeps_dirs() -> list[Path]:
    """Return the folders of the shipped sweep files: the checkout's sweeps/, then the copy
    that a non-editable install puts in <environment>/share/collective/sweeps."""
    return [Path(__file__).resolve().parents[2] / "sweeps", Path(sys.prefix) / "share" / "collective" / "sweeps"]


def find_sweep_file(name_or_path: str) -> Path:
    """Return the sweep file for a shipped name (accuracy, efficiency) or a path; raise SweepSpecError."""
    candidate = Path(name_or_path).expanduser()
    looks_like_path = candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path or candidate.exists()
    if looks_like_path:
        if candidate.is_file():
            return candidate.absolute()
        raise SweepSpecError(name_or_path, [f"sweep file not found: {candidate.absolute()}"])

    searched = [Path.cwd() / "sweeps" / f"{name_or_path}.yaml", *(d / f"{name_or_path}.yaml" for d in shipped_sweeps_dirs())]
    for path in searched:
        if path.is_file():
            return path
    raise SweepSpecError(
        name_or_path,
        [
            f"no sweep named {name_or_path!r}; looked for {', '.join(str(p) for p in searched)}; "
            f"use one of {', '.join(SHIPPED_SWEEPS)} or the path of a sweep file"
        ],
    )


def load_sweep_file(path: Path) -> dict[str, Any]:
    """Read a sweep file as a mapping; raise SweepSpecError when it is not valid YAML or not a mapping."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise SweepSpecError(str(path), [f"cannot read the file: {error}"]) from None
    except yaml.YAMLError as error:
        raise SweepSpecError(str(path), [f"not valid YAML: {error}"]) from None
    if not isinstance(data, dict):
        raise SweepSpecError(str(path), [f"expected a mapping with method, metric and parameters, got {type(data).__name__}"])
    return data


def sweep_name(config: Mapping[str, Any], path: Path) -> str:
    """Return the sweep's name: its ``name`` field, else the file name without extension."""
    name = config.get("name")
    return name if isinstance(name, str) and name.strip() else path.stem


def pin_parameters(config: Mapping[str, Any], pins: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` in which each pinned key is the constant parameter ``{value: v}``.

    A pinned key that the file does not search becomes a new constant parameter, so the runs of
    the sweep (on either backend) receive it through the params file.
    """
    pinned = copy.deepcopy(dict(config))
    parameters = pinned.get("parameters")
    if not isinstance(parameters, dict):
        parameters = {}
    for name, value in pins.items():
        parameters[name] = {"value": value}
    if pins:
        pinned["parameters"] = parameters
    return pinned


def with_default_command(config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return the config with DEFAULT_COMMAND filled in when it has none, and whether it was filled."""
    filled = dict(config)
    if "command" in filled:
        return filled, False
    filled["command"] = list(DEFAULT_COMMAND)
    return filled, True


def validate_sweep_config(config: Mapping[str, Any], backend: str) -> list[str]:
    """Return every problem of a sweep config for ``backend`` ("local" or "wandb"); empty when valid."""
    problems = _schema_problems(config)

    parameters = config.get("parameters")
    if isinstance(parameters, dict):
        for name, spec in parameters.items():
            problems.extend(_parameter_problems(name, spec))

    method = config.get("method")
    metric = config.get("metric")
    if method == "bayes" and not (isinstance(metric, dict) and metric.get("name")):
        problems.append("method bayes needs a metric: add `metric: {name: final/test_accuracy, goal: maximize}`")
    if isinstance(metric, dict) and "goal" not in metric:
        # W&B's schema defaults a missing goal to minimize, which would silently invert a sweep
        # over accuracy; the goal must be explicit.
        problems.append(f"metric {metric.get('name')!r} has no goal: add `goal: maximize` or `goal: minimize`")

    command = config.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(c, str) for c in command)):
        problems.append(f"command must be a list of strings, for example {DEFAULT_COMMAND}, got {command!r}")

    if backend == "local":
        if method == "custom":
            problems.append("method custom needs a W&B scheduler; use bayes, random or grid, or --backend wandb")
        for section, reason in _WANDB_ONLY_SECTIONS.items():
            if section in config:
                problems.append(f"{section}: not supported by the local backend ({reason}); remove it or use --backend wandb")
    return problems


def _schema_problems(config: Mapping[str, Any]) -> list[str]:
    """Return W&B's sweep schema violations as the `sweeps` package finds them, each with its location.

    A parameter that matches none of the schema's parameter shapes gets one message naming
    the fields its distribution requires, in place of the package's generic messages.
    """
    with warnings.catch_warnings():
        # sweeps 0.3.0 declares pydantic 1 model options that pydantic 2 warns about on import.
        warnings.simplefilter("ignore")
        from sweeps import schema_violations_from_proposed_config
        from sweeps.config.schema import sweep_config_jsonschema, validator

    # The package raises, instead of listing, on a parameter that is not a mapping, so those
    # are reported here and left out of its check.
    problems = []
    config = dict(config)
    parameters = config.get("parameters")
    if isinstance(parameters, dict):
        for name, spec in parameters.items():
            if not isinstance(spec, dict):
                problems.append(f"parameters.{name}: expected a mapping such as {{value: {spec!r}}} or {{values: [...]}}, got {spec!r}")
        config["parameters"] = {name: spec for name, spec in parameters.items() if isinstance(spec, dict)}
    try:
        messages = list(schema_violations_from_proposed_config(config))
    except ValueError as error:
        return problems + [str(error)]

    explained: dict[str, str] = {}
    located: dict[str, str] = {}
    for error in validator.iter_errors(config):
        path = [str(p) for p in error.path]
        if len(path) == 2 and path[0] == "parameters" and isinstance(error.instance, dict):
            detail = jsonschema.exceptions.best_match(error.context).message if error.context else error.message
            explained[error.message] = _explain_parameter(path[1], error.instance, sweep_config_jsonschema, detail)
            explained[f"invalid hyperparameter configuration: {path[1]}"] = ""
        elif path:
            located[error.message] = ".".join(path)

    for message in messages:
        if message in explained:
            if explained[message]:
                problems.append(explained[message])
        elif message in located:
            problems.append(f"{located[message]}: {message}")
        else:
            problems.append(message)
    return problems


def _explain_parameter(name: str, spec: Mapping[str, Any], schema: Mapping[str, Any], detail: str) -> str:
    """Return why a parameter matches no parameter shape of the W&B schema: missing or unknown fields."""
    if "values" in spec and not (isinstance(spec["values"], list) and spec["values"]):
        return f"parameters.{name}: values must be a non-empty list, got {spec['values']!r}"
    distribution = spec.get("distribution")
    shapes = []
    for reference in schema["definitions"]["parameter"]["anyOf"]:
        definition = schema["definitions"][reference["$ref"].rsplit("/", 1)[-1]]
        shapes.extend(definition.get("anyOf", [definition]))

    best: tuple[int, list[str], list[str]] | None = None
    for definition in shapes:
        properties = definition.get("properties", {})
        if distribution is not None and distribution not in properties.get("distribution", {}).get("enum", []):
            continue
        if distribution is None and "distribution" in definition.get("required", []):
            continue
        missing = [field for field in definition.get("required", []) if field not in spec]
        unknown = [field for field in spec if field not in properties]
        if best is None or len(missing) + len(unknown) < best[0]:
            best = (len(missing) + len(unknown), missing, unknown)

    if distribution is not None and best is None:
        return f"parameters.{name}: unknown distribution {distribution!r}; see W&B's sweep configuration reference for the list"
    if best is None or best[0] == 0:
        return f"parameters.{name}: {detail}, got {dict(spec)!r}"
    parts = []
    if best[1]:
        parts.append("missing " + ", ".join(best[1]))
    if best[2]:
        parts.append("unexpected " + ", ".join(best[2]))
    kind = f"distribution {distribution}" if distribution else "this parameter"
    return f"parameters.{name}: {kind} is invalid ({'; '.join(parts)}), got {dict(spec)!r}"


def _parameter_problems(name: str, spec: Any) -> list[str]:
    """Return problems of one parameter: unknown key, or values `collective train` would reject."""
    if name not in config_lib.KEYS:
        return [config_lib.unknown_key_message(name, "the sweep's parameters")]
    if not isinstance(spec, dict):
        return []  # already listed by the schema check

    problems = []
    if "value" in spec:
        problems.extend(_value_problems(name, spec["value"], "value"))
    if isinstance(spec.get("values"), list):
        for value in spec["values"]:
            problems.extend(_value_problems(name, value, "values"))
    # Only these distributions draw values between min and max themselves; log_uniform and the
    # normal family take exponents or moments there. Without a distribution the engine picks
    # int_uniform for integer bounds and uniform otherwise.
    if spec.get("distribution") in (None, "int_uniform", "uniform", "log_uniform_values", "q_uniform", "q_log_uniform_values"):
        for bound in ("min", "max"):
            if bound in spec:
                problems.extend(_value_problems(name, spec[bound], bound))
    return problems


def _value_problems(name: str, value: Any, field: str) -> list[str]:
    """Return the reasons `collective train` rejects ``value`` for key ``name``."""
    try:
        config_lib.validate({**config_lib.DEFAULTS, name: value})
    except config_lib.ConfigError as error:
        own = [p for p in error.problems if p.startswith(f"{name}:")]
        return [f"parameter {name}, {field}: {p.split(': ', 1)[1]}" for p in own]
    return []
