"""Initial ledger: sources, facts and their origins, commits, rejections, probe runs and reverts.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 15:40:48
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('reverts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('from_version', sa.Integer(), nullable=False),
    sa.Column('to_version', sa.Integer(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('requested_by', sa.Text(), nullable=False),
    sa.Column('reverted_commits', sa.Integer(), nullable=False),
    sa.Column('reverted_facts', sa.Integer(), nullable=False),
    sa.Column('weights_restored_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reverts'))
    )
    op.create_table('sources',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('location', sa.Text(), nullable=False),
    sa.Column('etag', sa.Text(), nullable=True),
    sa.Column('last_modified', sa.Text(), nullable=True),
    sa.Column('cursor', sa.Text(), nullable=True),
    sa.Column('consecutive_failures', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_polled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sources')),
    sa.UniqueConstraint('name', name=op.f('uq_sources_name'))
    )
    op.create_table('commits',
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('parent_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('fact_count', sa.Integer(), nullable=False),
    sa.Column('gate_verdict', sa.String(length=40), nullable=False),
    sa.Column('edit_metrics', sa.JSON(), nullable=False),
    sa.Column('probe_scores', sa.JSON(), nullable=False),
    sa.Column('artefact_path', sa.Text(), nullable=True),
    sa.Column('artefact_sha256', sa.String(length=64), nullable=True),
    sa.Column('weights_sha256', sa.String(length=64), nullable=True),
    sa.Column('model_fingerprint', sa.Text(), nullable=True),
    sa.Column('editor_version', sa.Text(), nullable=True),
    sa.Column('config_hash', sa.String(length=64), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=True),
    sa.Column('package_versions', sa.JSON(), nullable=False),
    sa.Column('reverted_by_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['reverted_by_id'], ['reverts.id'], name=op.f('fk_commits_reverted_by_id_reverts')),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_commits'))
    )
    op.create_table('rejections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('location', sa.Text(), nullable=False),
    sa.Column('position', sa.Text(), nullable=True),
    sa.Column('excerpt', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], name=op.f('fk_rejections_source_id_sources')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rejections'))
    )
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rejections_source_id'), ['source_id'], unique=False)
    op.create_table('facts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('target_new', sa.Text(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('ground_truth', sa.Text(), nullable=True),
    sa.Column('rephrase_prompts', sa.JSON(), nullable=False),
    sa.Column('locality', sa.JSON(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('prompt_hash', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Enum('pending', 'editing', 'committed', 'rejected', 'failed', 'reverted', 'superseded', name='fact_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('origin_location', sa.Text(), nullable=False),
    sa.Column('origin_position', sa.Text(), nullable=True),
    sa.Column('external_id', sa.Text(), nullable=True),
    sa.Column('observed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('supersedes_id', sa.Integer(), nullable=True),
    sa.Column('superseded_by_id', sa.Integer(), nullable=True),
    sa.Column('commit_version', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['commit_version'], ['commits.version'], name=op.f('fk_facts_commit_version_commits')),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], name=op.f('fk_facts_source_id_sources')),
    sa.ForeignKeyConstraint(['superseded_by_id'], ['facts.id'], name=op.f('fk_facts_superseded_by_id_facts')),
    sa.ForeignKeyConstraint(['supersedes_id'], ['facts.id'], name=op.f('fk_facts_supersedes_id_facts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_facts'))
    )
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_facts_commit_version'), ['commit_version'], unique=False)
        batch_op.create_index(batch_op.f('ix_facts_prompt_hash'), ['prompt_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_facts_source_id'), ['source_id'], unique=False)
        batch_op.create_index('ix_facts_status_id', ['status', 'id'], unique=False)
    op.create_table('probe_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('commit_version', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('duration_seconds', sa.Float(), nullable=True),
    sa.Column('passed', sa.Boolean(create_constraint=True, name='passed'), nullable=True),
    sa.Column('scores', sa.JSON(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['commit_version'], ['commits.version'], name=op.f('fk_probe_runs_commit_version_commits')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_probe_runs'))
    )
    with op.batch_alter_table('probe_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_probe_runs_commit_version'), ['commit_version'], unique=False)
    op.create_table('commit_facts',
    sa.Column('commit_version', sa.Integer(), nullable=False),
    sa.Column('fact_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['commit_version'], ['commits.version'], name=op.f('fk_commit_facts_commit_version_commits')),
    sa.ForeignKeyConstraint(['fact_id'], ['facts.id'], name=op.f('fk_commit_facts_fact_id_facts')),
    sa.PrimaryKeyConstraint('commit_version', 'fact_id', name=op.f('pk_commit_facts'))
    )
    with op.batch_alter_table('commit_facts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commit_facts_fact_id'), ['fact_id'], unique=False)
    op.create_table('fact_origins',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('fact_id', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('location', sa.Text(), nullable=False),
    sa.Column('position', sa.Text(), nullable=True),
    sa.Column('external_id', sa.Text(), nullable=True),
    sa.Column('observed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['fact_id'], ['facts.id'], name=op.f('fk_fact_origins_fact_id_facts')),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], name=op.f('fk_fact_origins_source_id_sources')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fact_origins'))
    )
    with op.batch_alter_table('fact_origins', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fact_origins_fact_id'), ['fact_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('fact_origins', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fact_origins_fact_id'))
    op.drop_table('fact_origins')
    with op.batch_alter_table('commit_facts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_commit_facts_fact_id'))
    op.drop_table('commit_facts')
    with op.batch_alter_table('probe_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_probe_runs_commit_version'))
    op.drop_table('probe_runs')
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.drop_index('ix_facts_status_id')
        batch_op.drop_index(batch_op.f('ix_facts_source_id'))
        batch_op.drop_index(batch_op.f('ix_facts_prompt_hash'))
        batch_op.drop_index(batch_op.f('ix_facts_commit_version'))
    op.drop_table('facts')
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rejections_source_id'))
    op.drop_table('rejections')
    op.drop_table('commits')
    op.drop_table('sources')
    op.drop_table('reverts')
