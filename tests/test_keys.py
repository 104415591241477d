"""No module outside the data-model package (gokiq_celery/sidekiq/) spells a Redis key.

Every key name gokiq uses is in gokiq_celery/sidekiq/keys.py: its constants, and the fixed
parts of the names its functions build. This test reads every other shipped module's string
literals (docstrings aside: prose may name a key) and fails on
- a literal (or an f-string's fixed part) without whitespace, as every key is, that starts or
  ends with a key name or with a fixed part of one that has a separator in it (`gokiq:bridges`,
  `queue:`, `-signals`, ...): prose and messages that mention `queue:<q>` are not keys;
- a literal equal to any key name given as the first argument of a Redis command
  (`zadd("retry", ...)`): Sidekiq's bare-word keys (`retry`, `queues`, ...) are also job fields
  and setting names, so only their use as a key is one (and `job.get("retry")` reads a field:
  methods a dict, list or set also has are left out of this check).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import redis

from gokiq_celery.sidekiq import keys

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "gokiq_celery" / "sidekiq"
SHIPPED = ["gokiq_celery", "bridge", "gokiq_history", "docker", "celeryconfig.py"]
HOLE = "\x00"
CONTAINER_METHODS = set(dir(dict)) | set(dir(list)) | set(dir(set))
REDIS_COMMANDS = frozenset(
    name for name in dir(redis.Redis) if not name.startswith("_") and name not in CONTAINER_METHODS
)


def key_names() -> tuple[set[str], set[str]]:
    """(every constant key name, every fixed part of a built name that holds a separator)."""
    names: set[str] = set()
    for name, value in vars(keys).items():
        if name.isupper() and isinstance(value, str):
            names.add(value)
        elif name.isupper() and isinstance(value, tuple):
            names.update(v for v in value if isinstance(v, str))
    fragments: set[str] = set()
    for func in vars(keys).values():
        if not inspect.isfunction(func) or func.__module__ != keys.__name__:
            continue
        args = [
            SimpleNamespace(before=lambda *_: None) if param == "version" else HOLE
            for param in inspect.signature(func).parameters
        ]
        built = func(*args)
        for text in built if isinstance(built, list) else [built]:
            fragments.update(
                part for part in text.split(HOLE) if sum(c.isalpha() for c in part) >= 3
            )
    fragments.update(keys.breaker_key(field) for field in keys.BREAKER_FIELDS)
    distinctive = {n for n in names | fragments if any(sep in n for sep in ":-")}
    return names, distinctive


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _looks_like_a_key(text: str, distinctive: set[str]) -> bool:
    if not text or any(c.isspace() for c in text):
        return False
    return any(text.startswith(name) or text.endswith(name) for name in distinctive)


def spelled_keys(source: str, names: set[str], distinctive: set[str]) -> list[str]:
    """The key names `source` spells, as 'line: literal'."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        literal = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if literal and id(node) not in skip and _looks_like_a_key(node.value, distinctive):
            found.append(f"{node.lineno}: {node.value!r}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in REDIS_COMMANDS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in names
        ):
            found.append(f"{node.lineno}: {node.func.attr}({node.args[0].value!r}, ...)")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def shipped_modules() -> list[Path]:
    paths = []
    for entry in SHIPPED:
        path = REPO / entry
        paths += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [path for path in paths if PACKAGE not in path.parents]


def test_the_keys_module_names_every_kind_of_key():
    names, distinctive = key_names()
    for expected in ("queues", "retry", "schedule", "dead", "processes", "gokiq:deliveries"):
        assert expected in names
    for expected in ("queue:", "gokiq:inflight:", "gokiq:moving:", "-signals", ":workers"):
        assert expected in distinctive
    assert "gokiq:sidecar:pybreaker:state" in distinctive


def test_the_check_finds_a_key_spelled_outside_the_package():
    names, distinctive = key_names()
    source = (
        "def f(client, bridge, queue, job):\n"
        '    """Moves `queue:<q>` into `gokiq:inflight:<bridge>:<q>`."""\n'
        '    client.zadd("retry", {})\n'
        '    client.lpush(f"gokiq:inflight:{bridge}:{queue}", job)\n'
        '    client.get("gokiq:sidecar:pybreaker:state")\n'
        '    client.sadd("queues", "default")\n'
        '    return job.get("retry"), {"queues": []}, "stat:processed", "queue: a name"\n'
    )
    found = spelled_keys(source, names, distinctive)
    assert [line.split(":")[0] for line in found] == ["3", "4", "5", "6", "7"], found


def test_no_module_outside_the_data_model_spells_a_redis_key():
    names, distinctive = key_names()
    modules = shipped_modules()
    relative = {path.relative_to(REPO).as_posix() for path in modules}
    assert {"bridge/runner.py", "gokiq_celery/tasks.py", "celeryconfig.py"} <= relative
    spelled = {
        path.relative_to(REPO).as_posix(): found
        for path in modules
        if (found := spelled_keys(path.read_text(), names, distinctive))
    }
    assert spelled == {}
