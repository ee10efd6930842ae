"""Collapse alarms: flag layers whose load is concentrated on few experts."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_LOAD_RATIO = "auto"
AUTO_MAX_LOAD_RATIO_CAP = 2.0
DEFAULT_DEAD_EXPERTS = 1


def auto_max_load_ratio(num_experts: int, top_k: int) -> float | None:
    """The default alarm threshold of a layer: halfway from balanced (1) to the most top-k routing
    allows (E/k: the busiest expert chosen by every token), at most 2.0. E=4, k=2 (LibMoE's runs):
    1.5, an expert chosen by 75 % of the tokens; E=8, k=2: 2.0. None (no test) when k >= E."""
    most = num_experts / max(int(top_k), 1)
    return min(AUTO_MAX_LOAD_RATIO_CAP, (1 + most) / 2) if most > 1 else None


@dataclass(frozen=True)
class CollapseThresholds:
    """A layer is flagged when ``max_load_ratio >= max_load_ratio`` or ``dead_experts >= dead_experts``.

    ``max_load_ratio="auto"``: each layer's :func:`auto_max_load_ratio` (a fixed 2.0 could only fire
    on total collapse at E/k = 2). ``None`` disables a test.
    """

    max_load_ratio: float | str | None = DEFAULT_MAX_LOAD_RATIO
    dead_experts: int | None = DEFAULT_DEAD_EXPERTS

    def __post_init__(self):
        ratio = self.max_load_ratio
        if not (ratio is None or ratio == "auto"
                or (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0)):
            raise ValueError(f"max_load_ratio must be 'auto', a number > 0 or None, got {ratio!r}")
        dead = self.dead_experts
        if not (dead is None or (isinstance(dead, int) and not isinstance(dead, bool) and dead >= 1)):
            raise ValueError(f"dead_experts must be an integer >= 1 or None, got {dead!r}")

    def max_load_threshold(self, num_experts: int, top_k: int) -> float | None:
        """The max-load-ratio threshold of a layer with ``num_experts`` experts and top-``top_k``."""
        if self.max_load_ratio == "auto":
            return auto_max_load_ratio(num_experts, top_k)
        return self.max_load_ratio

    def reasons(self, max_load_ratio: float, dead_experts: int, num_experts: int, top_k: int) -> list[str]:
        out = []
        threshold = self.max_load_threshold(num_experts, top_k)
        if threshold is not None and max_load_ratio >= threshold:
            out.append(f"max_load_ratio {max_load_ratio:.2f} >= {threshold:g}")
        if self.dead_experts is not None and dead_experts >= self.dead_experts:
            out.append(f"{dead_experts} dead expert(s) >= {self.dead_experts}")
        return out


def flag_collapse(table, thresholds: CollapseThresholds | None = None):
    """``table`` (metrics DataFrame) with an ``alarm`` column: the list of reasons (empty: fine)."""
    th = thresholds or CollapseThresholds()
    alarms = [th.reasons(r, int(d), int(e), int(k)) for r, d, e, k in
              zip(table["max_load_ratio"], table["dead_experts"], table["num_experts"], table["top_k"])]
    return table.assign(alarm=alarms)


def collapse_alarms(table, thresholds: CollapseThresholds | None = None):
    """Only the flagged rows of ``table`` (with their ``alarm`` reasons)."""
    flagged = flag_collapse(table, thresholds)
    return flagged[flagged["alarm"].map(bool)].reset_index(drop=True)
