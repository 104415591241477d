"""The ingestion API's audit: gokiq_ingest_audit.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gokiq_ingest_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("client", sa.Text),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("job_class", sa.Text),
        sa.Column("queue", sa.Text),
        sa.Column("jid", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("source_ip", sa.Text),
    )
    op.create_index("ix_gokiq_ingest_audit_at", "gokiq_ingest_audit", ["at"])
    op.create_index("ix_gokiq_ingest_audit_client_at", "gokiq_ingest_audit", ["client", "at"])


def downgrade() -> None:
    op.drop_table("gokiq_ingest_audit")
