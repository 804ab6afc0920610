"""Record why a fact's last try failed (facts.failure_cause) and when editing paused and resumed (pauses).

Existing facts get the cause their `last_error` shows: the edit loop wrote "the edit raised ..." for an
error and "efficacy ... < min_efficacy ..." for a missed target; every other rejected or failed fact
was turned down by the specificity check.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 23:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CAUSES = ('efficacy', 'specificity', 'error')


def upgrade() -> None:
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                'failure_cause',
                sa.Enum(*CAUSES, name='failure_cause', native_enum=False, create_constraint=True, length=16),
                nullable=True,
            )
        )
    op.create_table('pauses',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('paused_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('config_hash', sa.String(length=64), nullable=True),
    sa.Column('resumed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resumed_by', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pauses'))
    )
    facts = sa.table('facts', sa.column('status', sa.String), sa.column('last_error', sa.Text), sa.column('failure_cause', sa.String))
    missed = facts.c.last_error.like('efficacy %')
    op.execute(
        facts.update()
        .where(facts.c.status.in_(('failed', 'rejected')))
        .values(
            failure_cause=sa.case(
                (facts.c.last_error.like('the edit raised%'), 'error'), (missed, 'efficacy'), else_='specificity'
            )
        )
    )
    # Facts waiting for another try after a missed target: retried in small batches, with a stronger signal.
    op.execute(facts.update().where(facts.c.status.in_(('pending', 'editing')), missed).values(failure_cause='efficacy'))


def downgrade() -> None:
    op.drop_table('pauses')
    with op.batch_alter_table('facts', schema=None) as batch_op:
        # SQLite's batch copy would otherwise keep the column's CHECK constraint on the new table.
        batch_op.drop_constraint(batch_op.f('ck_facts_failure_cause'), type_='check')
        batch_op.drop_column('failure_cause')
