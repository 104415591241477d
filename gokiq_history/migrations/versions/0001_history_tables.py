"""The job history: gokiq_jobs and gokiq_job_attempts.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gokiq_jobs",
        sa.Column("jid", sa.Text, primary_key=True),
        sa.Column("job_class", sa.Text),
        sa.Column("queue", sa.Text),
        sa.Column("args", sa.Text),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("state_rank", sa.SmallInteger, nullable=False),
        sa.Column("state_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("enqueued_at", sa.Float),
        sa.Column("first_started_at", sa.Float),
        sa.Column("last_started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("error_class", sa.Text),
        sa.Column("error_message", sa.Text),
        sa.Column("error_at", sa.Float),
        sa.Column("worker", sa.Text),
        sa.Column("runtime", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_gokiq_jobs_created", "gokiq_jobs", ["created_at", "jid"])
    op.create_index("ix_gokiq_jobs_class_created", "gokiq_jobs", ["job_class", "created_at", "jid"])
    op.create_index("ix_gokiq_jobs_queue_created", "gokiq_jobs", ["queue", "created_at", "jid"])
    op.create_index("ix_gokiq_jobs_state_created", "gokiq_jobs", ["state", "created_at", "jid"])
    op.create_index("ix_gokiq_jobs_updated", "gokiq_jobs", ["updated_at"])
    op.create_table(
        "gokiq_job_attempts",
        sa.Column("jid", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("finished_at", sa.Float),
        sa.Column("outcome", sa.Text),
        sa.Column("error_class", sa.Text),
        sa.Column("error_message", sa.Text),
        sa.Column("worker", sa.Text),
        sa.Column("runtime", sa.Float),
        sa.PrimaryKeyConstraint("jid", "started_at", name="pk_gokiq_job_attempts"),
    )


def downgrade() -> None:
    op.drop_table("gokiq_job_attempts")
    op.drop_table("gokiq_jobs")
