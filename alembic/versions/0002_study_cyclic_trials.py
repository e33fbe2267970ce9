"""studies.cyclic_trials: the search budget used, kept on the study's row

A claim compares the study's cyclic trials with its budget; counting them scanned every
trial of the study, twice per claim, which grew with the study.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 06:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cyclic_trials", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE studies SET cyclic_trials = (SELECT COUNT(*) FROM trials "
        "WHERE trials.study_id = studies.id AND trials.kind = 'cyclic')"
    )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("cyclic_trials")
