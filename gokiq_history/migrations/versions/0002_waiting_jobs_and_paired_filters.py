"""Due times of waiting jobs (`due_at`) and the indexes of the two-filter listings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, columns): frozen here, a migration does not import the live schema.
INDEXES = (
    ("ix_gokiq_jobs_class_state_created", ["job_class", "state", "created_at", "jid"]),
    ("ix_gokiq_jobs_queue_state_created", ["queue", "state", "created_at", "jid"]),
)


def upgrade() -> None:
    op.add_column("gokiq_jobs", sa.Column("due_at", sa.Float))
    # On PostgreSQL the indexes are built CONCURRENTLY (outside the transaction): the bridge
    # and the workers keep writing while a large table is indexed.
    with op.get_context().autocommit_block():
        for name, columns in INDEXES:
            op.create_index(
                name, "gokiq_jobs", columns, postgresql_concurrently=True, if_not_exists=True
            )


def downgrade() -> None:
    for name, _ in INDEXES:
        op.drop_index(name, "gokiq_jobs")
    op.drop_column("gokiq_jobs", "due_at")
