"""Values the Python side and the Ruby sidecar must agree on, each defined once per language:
read from the sidecar's own code by Ruby, and compared with gokiq's."""

from __future__ import annotations

import json
import subprocess

import pytest

from gokiq_celery.metrics import DURATION_BUCKETS
from gokiq_celery.sidekiq.job import Job
from gokiq_celery.sidekiq.keys import SIDEKIQ_VERSION_KEY
from gokiq_celery.sidekiq.retry import MAX_ERROR_MESSAGE

from .conftest import REPO

# Payloads whose display name each side works out; Job.parse accepts every one.
PAYLOADS = [
    {"class": "HardJob", "args": []},
    {"class": "HardJob", "args": [], "display_class": "Shown"},
    {"class": "Wrapper", "args": [], "wrapped": "AjJob"},
    {"class": "Wrapper", "args": [], "wrapped": "AjJob", "display_class": "Shown"},
    {"class": "Wrapper", "args": [], "wrapped": "", "display_class": ""},
    {"class": "Wrapper", "args": [], "wrapped": "AjJob", "display_class": ""},
]

RUBY = """
require "json"
require "gokiq_sidecar"
runner = GokiqSidecar::Runner.allocate  # display_class needs no Rails app
payloads = JSON.parse($stdin.read)
puts JSON.generate(
  "sidekiq_version_key" => GokiqSidecar::SIDEKIQ_VERSION_KEY,
  "max_message" => GokiqSidecar::Runner::MAX_MESSAGE,
  "buckets" => GokiqSidecar::Metrics::BUCKETS,
  "display_classes" => payloads.map { |job| runner.display_class(job) }
)
"""


@pytest.fixture(scope="module")
def ruby_side() -> dict:
    done = subprocess.run(
        ["ruby", "-I", str(REPO / "rails_sidecar" / "lib"), "-e", RUBY],
        input=json.dumps(PAYLOADS),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_published_sidekiq_version_key(ruby_side):
    assert ruby_side["sidekiq_version_key"] == SIDEKIQ_VERSION_KEY


def test_the_error_message_cap(ruby_side):
    assert ruby_side["max_message"] == MAX_ERROR_MESSAGE


def test_the_job_duration_histogram_buckets(ruby_side):
    assert ruby_side["buckets"] == list(DURATION_BUCKETS)


def test_the_display_class_fallbacks(ruby_side):
    python = [Job.parse(json.dumps(payload)).display_class for payload in PAYLOADS]
    assert ruby_side["display_classes"] == python
    assert len(set(python)) > 2  # the payloads exercise more than one fallback
