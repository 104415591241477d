"""Flower on gokiq's config reads like Sidekiq's Web UI: tasks under their job class names, task
id = jid, arguments cut short; basic auth guards the UI and API."""

from __future__ import annotations

import pytest
import requests

from ..conftest import VENV_BIN, free_port, wait_for
from .conftest import Service, Stack

pytestmark = pytest.mark.e2e

AUTH = ("ops", "flower-test-password")


@pytest.fixture(scope="module")
def flower(stack: Stack, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = Service(
        "flower",
        [
            str(VENV_BIN / "celery"),
            "-A",
            "gokiq_celery",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        {**stack.env, "FLOWER_BASIC_AUTH": ":".join(AUTH)},
        tmp_path_factory.mktemp("flower") / "flower.log",
        lambda: _answers(url + "/healthcheck"),
    ).start()
    yield url, service
    service.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _task(flower: str, jid: str) -> dict | None:
    response = requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5)
    response.raise_for_status()
    return response.json().get(jid)


def test_flower_shows_jobs_as_sidekiq_would(stack: Stack, flower):
    flower, service = flower
    assert requests.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    hard, greet = stack.api(
        {"op": "perform_async", "class": "HardJob", "args": ["x" * 5000, {"n": 1}]},
        {
            "op": "perform_later",
            "class": "GreetJob",
            "args": [{"$person": "Bo"}],
            "kwargs": {"greeting": "Hi"},
        },
    )
    stack.wait_runs([hard], "HardJob", timeout=30)
    stack.wait_runs([greet], "GreetJob", timeout=30)
    hard_task = wait_for(lambda: _task(flower, hard), timeout=20, message="no task in Flower")
    greet_task = wait_for(lambda: _task(flower, greet), timeout=20, message="no task in Flower")
    assert hard_task["name"] == "HardJob" and hard_task["uuid"] == hard
    assert greet_task["name"] == "GreetJob"  # the ActiveJob class, not the wrapper
    assert hard_task["args"].startswith("['xxx") and len(hard_task["args"]) < 300
    wait_for(lambda: _task(flower, hard)["state"] == "SUCCESS", timeout=20)
    # Flower logs JSON lines like every gokiq process.
    lines = [line for line in service.lines() if line.strip() and not line.startswith("=====")]
    assert lines and all(line.lstrip().startswith("{") for line in lines), lines[:5]
    assert any(event.get("logger") == "flower.command" for event in service.json_lines())


def _tasks(flower: str, state: str) -> dict:
    """Flower's own filter (the Failed / Retried views): tasks in `state`, by task id."""
    response = requests.get(f"{flower}/api/tasks", params={"state": state}, auth=AUTH, timeout=5)
    response.raise_for_status()
    return response.json()


def test_flower_filters_find_dead_jobs_and_retried_attempts(stack: Stack, flower):
    """A job that went to the dead set is a FAILURE, with its error; each attempt that failed
    and was retried stays a RETRY (the next run is a task of its own, `<jid>.<n>`)."""
    flower, _service = flower
    fail, flaky = stack.api(
        {"op": "perform_async", "class": "FailJob", "args": []},  # retry: 2, then dead
        {"op": "perform_async", "class": "FlakyJob", "args": ["flower-flaky", 1]},
    )
    # Sidekiq's delays before retries 1 and 2: 15-24 s and 16-34 s.
    dead = wait_for(
        lambda: _tasks(flower, "FAILURE").get(f"{fail}.2"),
        timeout=180,
        interval=1,
        message="the dead job never showed as FAILURE",
    )
    assert dead["name"] == "FailJob" and "dead: ArgumentError: boom" in dead["exception"]
    wait_for(lambda: _task(flower, f"{flaky}.1")["state"] == "SUCCESS", timeout=60, interval=1)
    retried = _tasks(flower, "RETRY")
    assert {fail, f"{fail}.1", flaky} <= set(retried), sorted(retried)
    # Every run shows under the job's class, the bridge's and the retries' alike.
    assert {retried[key]["name"] for key in (fail, f"{fail}.1")} == {"FailJob"}
    assert "RuntimeError: flaky 1" in retried[flaky]["exception"]
    assert fail not in _tasks(flower, "SUCCESS") and flaky not in _tasks(flower, "FAILURE")
    assert [entry["jid"] for entry in stack.api1({"op": "dead"})] == [fail]
