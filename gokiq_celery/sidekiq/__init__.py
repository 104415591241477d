"""Sidekiq's data model: the job payload (job.py), its retry rules (retry.py), which Sidekiq
the app runs (version.py), and its Redis data, one module per part (keys.py names every key;
store.py lists the parts). No HTTP here, and no module outside this package spells a key."""

from .job import ACTIVE_JOB_WRAPPERS, InvalidJob, Job
from .retry import Decision, Failure, Outcome, RetryPolicy
from .store import SidekiqStore

__all__ = [
    "ACTIVE_JOB_WRAPPERS",
    "Decision",
    "Failure",
    "InvalidJob",
    "Job",
    "Outcome",
    "RetryPolicy",
    "SidekiqStore",
]
