"""Collapse alarms: flag layers whose load is concentrated on few experts."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_LOAD_RATIO = 2.0
DEFAULT_DEAD_EXPERTS = 1


@dataclass(frozen=True)
class CollapseThresholds:
    """A layer is flagged when ``max_load_ratio >= max_load_ratio`` or ``dead_experts >= dead_experts``.

    ``None`` disables a test. With top-k routing the max-load ratio is at most E/k.
    """

    max_load_ratio: float | None = DEFAULT_MAX_LOAD_RATIO
    dead_experts: int | None = DEFAULT_DEAD_EXPERTS

    def reasons(self, max_load_ratio: float, dead_experts: int) -> list[str]:
        out = []
        if self.max_load_ratio is not None and max_load_ratio >= self.max_load_ratio:
            out.append(f"max_load_ratio {max_load_ratio:.2f} >= {self.max_load_ratio:g}")
        if self.dead_experts is not None and dead_experts >= self.dead_experts:
            out.append(f"{dead_experts} dead expert(s) >= {self.dead_experts}")
        return out


def flag_collapse(table, thresholds: CollapseThresholds | None = None):
    """``table`` (metrics DataFrame) with an ``alarm`` column: the list of reasons (empty: fine)."""
    th = thresholds or CollapseThresholds()
    alarms = [th.reasons(r, int(d)) for r, d in zip(table["max_load_ratio"], table["dead_experts"])]
    return table.assign(alarm=alarms)


def collapse_alarms(table, thresholds: CollapseThresholds | None = None):
    """Only the flagged rows of ``table`` (with their ``alarm`` reasons)."""
    flagged = flag_collapse(table, thresholds)
    return flagged[flagged["alarm"].map(bool)].reset_index(drop=True)
