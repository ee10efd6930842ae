"""Expert specialisation: mutual information between expert choice and task / token kind.

Observations are routing slots: each of a token's k chosen experts counts once, so
the joint table (task x expert) has the same total as the load counts.
"""

from __future__ import annotations

import numpy as np

from . import metrics as M
from .accumulate import RoutingStats


def specialisation_table(stats: RoutingStats, **filters):
    """Per (checkpoint, placement, layer): MI and normalised MI with task and with token kind.

    Counts of by-groups (if the stats were grouped ``by``) are summed per layer.
    """
    import pandas as pd

    records = []
    seen = {}
    for key in stats.keys:
        seen.setdefault(key[:3], None)
    fixed = {name: filters.pop(name) for name in ("checkpoint", "placement", "layer") if name in filters}
    for checkpoint, placement, layer in seen:
        here = {"checkpoint": checkpoint, "placement": placement, "layer": layer}
        if any(here[name] != value for name, value in fixed.items()):
            continue
        idx = stats.select(**here, **filters)
        if not len(idx):
            continue
        e = int(stats.num_experts[idx].max())
        jt = stats.joint_task[idx].sum(axis=0)[:, :e]
        jk = stats.joint_kind[idx].sum(axis=0)[:, :e]
        records.append({
            "checkpoint": checkpoint, "placement": placement, "layer": layer,
            "mi_task": M.mutual_information(jt), "nmi_task": M.normalised_mutual_information(jt),
            "mi_token_kind": M.mutual_information(jk), "nmi_token_kind": M.normalised_mutual_information(jk),
        })
    return pd.DataFrame.from_records(records)


def over_represented(stats: RoutingStats, placement: str, layer: int, of: str = "task", top: int = 3, **filters):
    """The ``top`` experts most over-represented per task (or token kind).

    lift = P(expert | task) / P(expert); columns: task, expert, share (P(expert | task)),
    overall (P(expert)), lift; sorted by task then decreasing lift.
    """
    import pandas as pd

    joint = stats.joint(placement, layer, of=of, **filters)
    counts = joint.to_numpy(dtype=np.float64)
    overall = counts.sum(axis=0) / max(counts.sum(), 1.0)
    records = []
    for name, row in zip(joint.index, counts):
        share = row / max(row.sum(), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(overall > 0, share / overall, np.nan)
        for e in np.argsort(-np.nan_to_num(lift, nan=-1.0), kind="stable")[:top]:
            records.append({of: name, "expert": int(e), "share": float(share[e]), "overall": float(overall[e]),
                            "lift": float(lift[e])})
    return pd.DataFrame.from_records(records)
