"""Typed settings (trace/settings.py): defaults from the schema alone, one-line errors, no drift between the
dataclasses and the schema, and no module of the package reading a raw config dict or importing in a loop."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from trace import settings as S
from trace.methods import METHODS
from trace.train.objectives import OBJECTIVES

PACKAGE = REPO_ROOT / "trace"
SETTINGS_CLASSES = [c for c in vars(S).values()
                    if isinstance(c, type) and issubclass(c, S.Settings) and c is not S.Settings]


@pytest.mark.parametrize("kind", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_every_settings_class_has_exactly_its_schema_keys(kind):
    """A key added to the schema but not to the dataclass (or the reverse) fails here, not in a job."""
    fields = {f.name for f in dataclasses.fields(kind)}
    properties = set(S._properties(kind.SCHEMA))
    if kind is S.TrainRun:
        properties.discard("parallel")  # the launch shape: trace/launch.py, never a run's setting
    assert fields == properties


def test_defaults_come_from_the_schema():
    schema = yaml.safe_load((REPO_ROOT / "workflow/schemas/config.schema.yaml").read_text())
    train = schema["properties"]["train"]["properties"]
    minimal = {k: v for k, v in S.default_train_section().items()
               if k in schema["properties"]["train"]["required"]}
    run = S.TrainRun.from_mapping({**minimal, "method": "trace_fkl"})
    assert run.rollout.engine == train["rollout"]["properties"]["engine"]["default"] == "hf"
    assert run.rollout.gpu_memory_utilization == 0.3 and run.rollout.annotator_server is None
    assert run.validation.k == train["validation"]["properties"]["k"]["default"] == 4
    assert run.validation.every == 0 and run.validation.select == "last" and run.probe.steps == ()
    assert run.annotator.tier == "toy_oracle" and run.annotator.batch_size == 64
    assert run.annotator.likelihood.error_threshold == 1.5 and run.annotator.prompted.thinking is None
    assert run.seed == 0 and run.thinking is False and run.teacher_check_on_worse == "refuse"
    assert run.micro_batch_tokens is None and run.rollout_rng == "auto" and run.dual_clip_c is None
    parallel = S.Parallel.from_mapping(None)
    assert (parallel.nodes, parallel.procs_per_node, parallel.runtime_min, parallel.rdzv_port) == (1, 1, 1440, 29500)
    # the launcher reads the same defaults (it is loaded by path, without trace.settings)
    from trace.launch import parallel_defaults

    assert parallel_defaults() == dataclasses.asdict(parallel)


def test_config_yaml_round_trips_and_nested_replace():
    run = S.default_run("trace_fkl")
    assert S.TrainRun.from_json(json.dumps(run.to_dict())) == run  # the JSON a job gets is the settings
    changed = S.replace(run, kl={"alpha": 0.5}, steps=3)
    assert changed.kl.alpha == 0.5 and changed.kl.w0 == run.kl.w0 and changed.steps == 3 and run.kl.alpha == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.kl.alpha = 1.0
    override = S.SamplingOverrides.from_mapping({"max_new_tokens": 5})
    assert override.over(run.sampling).as_dict() == {**run.sampling.as_dict(), "max_new_tokens": 5}


@pytest.mark.parametrize("values, message", [
    ({"kl": {"alpha": 1.5}}, r"^train\.kl\.alpha: 1\.5 is greater than the maximum of 1$"),
    ({"kl": {"alfa": 0.2}}, r"^train\.kl: unknown key\(s\) \['alfa'\]; known: \['alpha', "),
    ({"method": "trace"}, r"^train\.method: 'trace' is not one of \['grpo', "),
    ({"rollout": {"engine": "sglang"}}, r"^train\.rollout\.engine: 'sglang' is not one of \['hf', 'vllm'\]$"),
    ({"annotator": {"tier": "api"}}, r"^train\.annotator\.http: None is not of type 'object'$"),
    ({"steps": "20"}, r"^train\.steps: '20' is not of type 'integer'$"),
])
def test_bad_settings_are_one_line_naming_the_key(values, message):
    base = S.default_train_section()
    merged = {**base, "method": "grpo", **{k: ({**base[k], **v} if isinstance(v, dict) and k in base else v)
                                           for k, v in values.items()}}
    with pytest.raises(S.SettingsError, match=message) as caught:
        S.TrainRun.from_mapping(merged)
    assert "\n" not in str(caught.value)


def test_a_stage_names_its_cfg_in_the_error(tmp_path):
    from trace.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["toy-data", "--cfg", json.dumps({"seed": 0}), "--out-dir", str(tmp_path)])
    assert exit_.value.code == 2 and not any(tmp_path.iterdir())


def test_every_method_has_an_objective_and_an_existing_divergence():
    from trace.losses import DIVERGENCES

    for name, method in METHODS.items():
        assert method.objective in OBJECTIVES, name
        assert method.divergence in DIVERGENCES, name


# ---------------------------------------------------------------------------------------------- the package's shape
PLANNING = {  # read the study config as Snakemake holds it, to plan jobs: the only readers of raw config dicts
    "trace/study_config.py": "validates the merged study config",
    "trace/launch.py": "the train rule's launcher and resources from train.parallel (loaded by path)",
    "trace/preflight.py": "checks a cluster submission's config before any job",
    "trace/settings.py": "turns mappings into settings",
    "trace/study_plan.py": "the study grid the rules wire: run names, files, each job's --cfg (loaded by path)",
}
RAW_CONFIG = re.compile(r"\b(cfg|config|train_cfg|settings)(\[['\"]|\.get\(['\"])")


def test_no_module_indexes_a_raw_config_dict():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO_ROOT))
        if rel in PLANNING:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if RAW_CONFIG.search(line.split("#")[0]):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


def _imports_of(path: Path, module: str) -> set[str]:
    """Every trace module ``module`` imports, at the top or inside a function (``from . import x`` resolved)."""
    found = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {m for m in _imports_of(path, name) if m in modules and m != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_go_one_way_between_modules_and_subpackages():
    graph = _module_graph()
    assert _cycles(graph) == []
    subpackage = {name: ".".join(name.split(".")[:2]) for name in graph}
    packages = {p: set() for p in subpackage.values()}
    for name, targets in graph.items():
        packages[subpackage[name]] |= {subpackage[t] for t in targets if subpackage[t] != subpackage[name]}
    assert _cycles(packages) == []  # e.g. trace.train -> trace.annotate, never back


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
