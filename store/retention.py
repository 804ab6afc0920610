"""Which artefacts a rebuild needs and which may go: chains, rebuild plans, snapshots, the retention horizon.

Pure bookkeeping over version numbers: no I/O, no tensors.

- A version's *chain* lists the versions from 0 up to it, following each commit's parent (the
  ledger's `parent_version`); after a revert, new commits start a new branch from the target.
- A *rebuild plan* for version v starts from the newest snapshot on v's chain at or below v (0, the
  base model, always counts as one) and replays the later commits of the chain in order. It exists
  only while each of those commits still has its artefact.
- *Pruning* keeps the newest `keep` commits of the active chain rebuildable: it finds the newest
  snapshot at or below the oldest of them (the *anchor*) and removes every artefact older than the
  anchor. The anchor is then the *horizon*: the oldest version a revert can reach.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from store.artefacts import ArtefactError


class BeyondHorizon(ArtefactError):
    """A revert or rebuild target whose artefacts were consolidated away by the retention policy."""


class BrokenChain(ArtefactError):
    """The commit parents given do not lead from a version down to 0 (a version unknown to the ledger)."""


def chain_to(version: int, parents: Mapping[int, int]) -> list[int]:
    """[0, ..., version]: the versions whose commits make up `version`, oldest first.

    `parents` maps every commit version to its parent version. Raises BrokenChain for a version
    that is not in `parents` or a cycle.
    """
    chain = [version]
    while chain[-1] != 0:
        current = chain[-1]
        if current not in parents:
            raise BrokenChain(f"version {current} is not a commit in the ledger; choose a version it lists")
        parent = parents[current]
        if parent >= current or len(chain) > len(parents) + 1:
            raise BrokenChain(f"commit {current} has parent {parent}; parents must be older versions")
        chain.append(parent)
    return chain[::-1]


@dataclass(frozen=True)
class RebuildPlan:
    """How to rebuild `target`: load the snapshot at `start` (0: the base model), then replay `commits` in order."""

    target: int
    start: int
    commits: tuple[int, ...]


def plan_rebuild(chain: Sequence[int], snapshots: Collection[int], commits: Collection[int]) -> RebuildPlan:
    """The cheapest rebuild of `chain[-1]` from the artefacts present (`snapshots`, `commits`: their versions).

    Raises BeyondHorizon naming the missing commit artefact and the oldest version that can still be rebuilt.
    """
    target = chain[-1]
    replay: list[int] = []
    for version in reversed(chain):
        if version == 0 or version in snapshots:
            return RebuildPlan(target, version, tuple(reversed(replay)))
        if version not in commits:
            raise BeyondHorizon(
                f"version {target} cannot be rebuilt: the artefact of commit {version} on its chain was removed "
                "by the retention policy (store.retention_commits) and no snapshot at or below it remains"
            )
        replay.append(version)
    raise BrokenChain(f"chain {list(chain)[:3]}... does not start at version 0")


def horizon(chain: Sequence[int], snapshots: Collection[int], commits: Collection[int]) -> int:
    """The oldest version h of `chain` such that every version from h to the chain's end can be rebuilt."""
    rebuildable = []
    ok = False
    for version in chain:
        ok = version == 0 or version in snapshots or (ok and version in commits)
        rebuildable.append(ok)
    oldest = chain[-1]
    for version, ok in zip(reversed(chain), reversed(rebuildable), strict=True):
        if not ok:
            break
        oldest = version
    return oldest


def commits_since_snapshot(chain: Sequence[int], snapshots: Collection[int]) -> int:
    """How many commits of the chain come after its newest snapshot (the base model counts as one)."""
    count = 0
    for version in reversed(chain):
        if version == 0 or version in snapshots:
            return count
        count += 1
    return count


def snapshot_due(chain: Sequence[int], snapshots: Collection[int], every: int) -> bool:
    """True when the chain's end is `every` or more commits past its newest snapshot (`every` 0: never)."""
    return every > 0 and commits_since_snapshot(chain, snapshots) >= every


@dataclass(frozen=True)
class Pruning:
    """What a retention pass removes; `anchor` is the horizon afterwards."""

    anchor: int
    commits: tuple[int, ...]
    snapshots: tuple[int, ...]


def plan_pruning(
    chain: Sequence[int], snapshots: Collection[int], commits: Collection[int], keep: int | None
) -> Pruning:
    """Keep the newest `keep` commits of the active `chain` rebuildable and drop every older artefact.

    The anchor is the newest snapshot on the chain at or below the oldest kept commit; artefacts of
    versions below it (on any branch) go, the genesis snapshot (0) stays. `keep` None keeps everything.
    """
    if keep is None:
        return Pruning(0, (), ())
    wanted = chain[max(0, len(chain) - 1 - keep)]
    anchor = max(v for v in chain if v <= wanted and (v == 0 or v in snapshots))
    return Pruning(
        anchor,
        tuple(sorted(v for v in commits if v < anchor)),
        tuple(sorted(v for v in snapshots if 0 < v < anchor)),
    )
