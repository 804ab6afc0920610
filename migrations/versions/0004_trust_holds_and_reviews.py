"""Trust: facts held for review or by a source's limits (status `held`, facts.hold_reason, facts.queued_at),
and the review audit trail (reviews).

`queued_at` of existing facts stays empty: only facts queued from now on count towards a source's hourly
limit, which errs on the side of letting facts through once after the upgrade.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ('pending', 'editing', 'committed', 'rejected', 'failed', 'reverted', 'superseded')
NEW_STATUSES = (*OLD_STATUSES, 'held')
HOLD_REASONS = ('review', 'protected', 'conflict', 'rate_limit', 'pending_limit')
ACTIONS = ('approved', 'rejected', 'released')


def _status_check(values: Sequence[str]) -> str:
    return 'status IN (' + ', '.join(f"'{v}'" for v in values) + ')'


def _hold_reason() -> sa.Enum:
    return sa.Enum(*HOLD_REASONS, name='hold_reason', native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_facts_fact_status'), type_='check')
        batch_op.create_check_constraint(batch_op.f('ck_facts_fact_status'), _status_check(NEW_STATUSES))
        batch_op.add_column(sa.Column('hold_reason', _hold_reason(), nullable=True))
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table('reviews',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('fact_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.Enum(*ACTIONS, name='review_action', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('hold_reason', _hold_reason(), nullable=True),
    sa.Column('reviewer', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['fact_id'], ['facts.id'], name=op.f('fk_reviews_fact_id_facts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reviews'))
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reviews_fact_id'), ['fact_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reviews_fact_id'))
    op.drop_table('reviews')
    # Held facts have no place in the older state machine: they go back to pending, as they were before.
    facts = sa.table('facts', sa.column('status', sa.String))
    op.execute(facts.update().where(facts.c.status == 'held').values(status='pending'))
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_facts_hold_reason'), type_='check')
        batch_op.drop_column('queued_at')
        batch_op.drop_column('hold_reason')
        batch_op.drop_constraint(batch_op.f('ck_facts_fact_status'), type_='check')
        batch_op.create_check_constraint(batch_op.f('ck_facts_fact_status'), _status_check(OLD_STATUSES))
