"""Chains, rebuild plans, snapshots due and pruning: the bookkeeping behind restarts, reverts and the horizon."""

from __future__ import annotations

import random

import pytest

from store.retention import (
    BeyondHorizon,
    BrokenChain,
    chain_to,
    commits_since_snapshot,
    horizon,
    plan_pruning,
    plan_rebuild,
    snapshot_due,
)

# 1 <- 2 <- 3 <- 4, then a revert to 2 and commits 5 <- 6 on top of it.
PARENTS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 2, 6: 5}


def test_chains_follow_parents_across_a_revert() -> None:
    assert chain_to(6, PARENTS) == [0, 1, 2, 5, 6]
    assert chain_to(4, PARENTS) == [0, 1, 2, 3, 4]
    assert chain_to(0, PARENTS) == [0]
    with pytest.raises(BrokenChain, match="version 9"):
        chain_to(9, PARENTS)
    with pytest.raises(BrokenChain, match="parents must be older"):
        chain_to(2, {1: 2, 2: 1})


def test_a_rebuild_starts_from_the_newest_snapshot_on_the_chain() -> None:
    chain = chain_to(6, PARENTS)
    assert plan_rebuild(chain, {3, 4}, {1, 2, 3, 4, 5, 6}).start == 0  # snapshots 3, 4 are on another branch
    plan = plan_rebuild(chain, {2}, {3, 4, 5, 6})
    assert (plan.start, plan.commits) == (2, (5, 6))
    assert plan_rebuild(chain, {6}, set()).commits == ()


def test_a_missing_commit_without_a_snapshot_below_is_beyond_the_horizon() -> None:
    with pytest.raises(BeyondHorizon, match="commit 1 on its chain was removed"):
        plan_rebuild(chain_to(4, PARENTS), set(), {2, 3, 4})


def test_horizon_and_snapshot_due() -> None:
    chain = [0, 1, 2, 3, 4, 5]
    assert horizon(chain, set(), {1, 2, 3, 4, 5}) == 0
    assert horizon(chain, {3}, {4, 5}) == 3
    assert horizon(chain, {3}, {5}) == 5  # commit 4 lost: not even the end is rebuildable; degenerate, the end
    assert commits_since_snapshot(chain, {3}) == 2
    assert snapshot_due(chain, {3}, 2) and not snapshot_due(chain, {3}, 3) and not snapshot_due(chain, set(), 0)


def test_pruning_removes_only_what_is_older_than_the_anchor() -> None:
    chain = chain_to(6, PARENTS)
    pruning = plan_pruning(chain, {2, 5}, {1, 2, 3, 4, 5, 6}, keep=1)
    assert (pruning.anchor, pruning.commits, pruning.snapshots) == (5, (1, 2, 3, 4), (2,))
    assert plan_pruning(chain, {2, 5}, {1, 2, 3, 4, 5, 6}, keep=None).commits == ()
    assert plan_pruning(chain, set(), {1, 2, 5, 6}, keep=1).anchor == 0  # no snapshot: nothing can go


def test_after_pruning_the_newest_keep_commits_stay_rebuildable() -> None:
    rng = random.Random(7)
    for _ in range(200):
        parents: dict[int, int] = {}
        current = 0
        for version in range(1, rng.randrange(2, 40)):
            if current and rng.random() < 0.2:  # a revert to an earlier version of the chain
                current = rng.choice(chain_to(current, parents)[:-1])
            parents[version] = current
            current = version
        chain = chain_to(current, parents)
        snapshots = {v for v in parents if rng.random() < 0.25}
        commits = set(parents)
        keep = rng.randrange(1, 10)
        pruning = plan_pruning(chain, snapshots, commits, keep)
        left_snapshots = snapshots - set(pruning.snapshots)
        left_commits = commits - set(pruning.commits)
        for version in chain[-keep - 1 :]:
            plan_rebuild(chain_to(version, parents), left_snapshots, left_commits)  # raises if not rebuildable
        assert horizon(chain, left_snapshots, left_commits) <= pruning.anchor  # nothing at or above it was lost
