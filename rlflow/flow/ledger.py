"""The exactly-once ledger: every sample the run issued, against the optimizer steps that consumed it.

The launcher records each step's trained and skipped logical uids from the actor's metrics report
(``record``), drops the steps a rewind discards (``rewind``), adopts what a checkpoint says its steps
consumed (``adopt``: a resumed run, or a kept step whose report never arrived), and remembers the
groups issued by feeders that were replaced. ``counts`` is what summary.json's ``samples`` holds: a
correct run has ``consumed_more_than_once == issued_not_consumed == consumed_not_issued == 0``.
"""

from __future__ import annotations

from collections import Counter

from rlflow.flow.feeder import group_uids, logical_uid


class Ledger:
    def __init__(self, group_size: int):
        self.group_size = group_size
        self.trained: dict[int, list[str]] = {}  # step -> logical uids it trained (none: the step made no update)
        self.skipped: dict[int, list[str]] = {}  # step -> logical uids it consumed without training
        self.filtered: dict[int, list[str]] = {}  # step -> those of them dynamic sampling dropped (a subset)
        self.replaced_issued: set[str] = set()  # logical ids of groups issued by feeders that were replaced

    def record(self, step: int, trained_uids: list[str], skipped_uids: list[str],
               filtered_uids: list[str] = ()) -> None:
        """A step's report: the bus uids it trained, those it consumed without training, and which of
        those dynamic sampling dropped (``data.filter_groups``)."""
        self.trained[step] = [logical_uid(u) for u in trained_uids]
        self.skipped[step] = [logical_uid(u) for u in skipped_uids]
        self.filtered[step] = [logical_uid(u) for u in filtered_uids]

    def rewind(self, version: int) -> None:
        """Forget the steps after ``version`` (a rewind trains them again)."""
        self.trained = {s: uids for s, uids in self.trained.items() if s <= version}
        self.skipped = {s: uids for s, uids in self.skipped.items() if s <= version}
        self.filtered = {s: uids for s, uids in self.filtered.items() if s <= version}

    def adopt(self, trained: dict[int, list[str]], skipped: dict[int, list[str]],
              filtered: dict[int, list[str]] | None = None) -> None:
        """What a checkpoint says its steps consumed, for steps this ledger has no report of."""
        for s, uids in trained.items():
            self.trained.setdefault(s, uids)
        for s, uids in skipped.items():
            self.skipped.setdefault(s, uids)
        for s, uids in (filtered or {}).items():
            self.filtered.setdefault(s, uids)

    @property
    def steps(self) -> int:
        """Steps done (updated or not)."""
        return len(self.trained)

    @property
    def last_step(self) -> int:
        return max(self.trained, default=0)

    @property
    def updated(self) -> int:
        """Steps that made an optimizer update (trained at least one sample)."""
        return sum(1 for uids in self.trained.values() if uids)

    def counts(self, issued_groups: set[str]) -> dict[str, int]:
        """The accounting of every issued sample (``issued_groups``: logical group ids of the live feeder;
        the replaced feeders' are added here), trained or skipped (a failed reward, a group without
        signal); ``filtered`` counts the skipped that dynamic sampling dropped (and had replaced).
        Replacement groups of replaced feeders are left out: a rewind discards the steps that asked
        for them, and the steps after it ask for their own."""
        groups = {g for g in self.replaced_issued if g.startswith("g")} | issued_groups
        issued = {u for g in groups for u in group_uids(g, self.group_size)}
        consumed = Counter(u for step in (self.trained, self.skipped) for uids in step.values() for u in uids)
        return {"issued": len(issued), "trained": len({u for uids in self.trained.values() for u in uids}),
                "skipped": len({u for uids in self.skipped.values() for u in uids}),
                "filtered": len({u for uids in self.filtered.values() for u in uids}),
                "consumed_more_than_once": sum(1 for n in consumed.values() if n > 1),
                "issued_not_consumed": len(issued - consumed.keys()),
                "consumed_not_issued": len(consumed.keys() - issued)}
