"""Sidekiq's data model: the job payload, its Redis keys and its retry rules. No HTTP here."""

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
