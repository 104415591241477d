"""The modules import each other without a cycle, and importing them configures nothing."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("gokiq_celery", "bridge", "gokiq_history")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each of gokiq's modules -> the gokiq modules it imports, at the top or in a function."""
    paths = [REPO / "celeryconfig.py"]
    for package in PACKAGES:
        paths += sorted((REPO / package).rglob("*.py"))
    modules = {_module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *filter(None, [base])])
                # `from . import x` imports x; `from .x import y`, x (and y if a module).
                targets = [f"{base}.{alias.name}" for alias in node.names]
                targets += [base] if node.module else []
            else:
                continue
            imported.update(t for t in targets if t in modules and t != name)
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, as the modules along it, or [] when there is none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_gokiq_modules():
    graph = import_graph()
    assert graph["gokiq_celery.tasks"] >= {"gokiq_celery.celery_app", "gokiq_celery.worker"}
    assert "gokiq_celery.sidekiq.store" in graph["bridge.runner"]
    assert find_cycle(graph) == []


def test_importing_the_worker_side_reads_no_setting_and_configures_no_logging():
    """A setting that would stop a worker (GOKIQ_SIDEKIQ_VERSION=5) does not stop an import:
    settings are read, and logging set up, when a process starts."""
    code = (
        "import logging, gokiq_celery.celery_app, gokiq_celery.tasks, gokiq_celery.enqueue\n"
        "import celeryconfig, bridge.runner\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "from gokiq_celery.settings import process_settings\n"
        "assert process_settings.cache_info().currsize == 0\n"
    )
    env = {**os.environ, "GOKIQ_SIDEKIQ_VERSION": "5"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
