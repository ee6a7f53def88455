"""The package's import graph goes one way: the commands (train, evaluate, export, study,
plan) on top, the training loop under them, the run builder under that, and everything else
(models, data, sharding, steps, checkpoints, tasks) at the bottom. No module imports one above
it, and only the commands that train import the training loop."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxsftdpo"

LAYERS = {"jaxsftdpo.train": 3, "jaxsftdpo.evaluate": 3, "jaxsftdpo.export": 3,
          "jaxsftdpo.study": 3, "jaxsftdpo.plan": 3, "jaxsftdpo.trainer": 2,
          "jaxsftdpo.runs": 1}  # the rest: 0
TRAINING_COMMANDS = {"jaxsftdpo.train", "jaxsftdpo.study"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """The package's modules `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in MODULES}


GRAPH = {name: imported(path) - {name} for name, path in MODULES.items()}


def layer(name: str) -> int:
    return LAYERS.get(name, 0)


def test_no_module_imports_one_above_it():
    back_edges = [f"{name} ({layer(name)}) imports {other} ({layer(other)})"
                  for name, others in GRAPH.items() for other in others
                  if layer(other) > layer(name) or (layer(other) == layer(name) > 0)]
    assert not back_edges, back_edges


def test_only_the_training_commands_import_the_training_loop():
    importers = {name for name, others in GRAPH.items() if "jaxsftdpo.trainer" in others}
    assert importers == TRAINING_COMMANDS


def test_checkpoints_know_nothing_of_the_steps():
    assert "jaxsftdpo.steps" not in GRAPH["jaxsftdpo.checkpoint"]


def test_the_graph_is_read():
    assert {"jaxsftdpo.runs", "jaxsftdpo.models"} <= GRAPH["jaxsftdpo.trainer"] | GRAPH[
        "jaxsftdpo.runs"]
    assert "jaxsftdpo.runs" in GRAPH["jaxsftdpo.evaluate"]
