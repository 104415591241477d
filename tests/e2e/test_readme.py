"""The README's settings table is the Settings dataclass: every field, its variable, its default."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gokiq_celery.settings import _ENV_NAMES, Settings

from ..conftest import REPO

pytestmark = pytest.mark.e2e


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.name == "queues":
        return " ".join(q.name for q in value)
    return repr(value) if isinstance(value, str) and value == "" else str(value)


def test_every_setting_is_documented_with_its_variable_and_default():
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| `(\w+)` \| `([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    fields = dataclasses.fields(Settings)
    assert set(rows) == {f.name for f in fields}
    for f in fields:
        env = _ENV_NAMES.get(f.name, f"GOKIQ_{f.name.upper()}")
        assert rows[f.name] == (env, _default(f).replace("''", '""')), f.name
