"""The cells of the results table: a row compares our side with the reference on one metric
(median and min-max over rounds, ratio of the medians, and the target where the issue sets one).
Every workload module builds its rows with :func:`row`; :mod:`.report` lays them out."""

from __future__ import annotations

import statistics


def stats(values) -> dict:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def row(name, metric, ours, ref, *, higher_is_better=True, target=None):
    o, r = stats(ours), stats(ref)
    ratio = o["median"] / r["median"] if r["median"] else float("nan")
    d = {"row": name, "metric": metric, "ours": o, "reference": r, "ratio": ratio,
         "higher_is_better": higher_is_better}
    if target is not None:
        d["target"] = target
        d["target_met"] = bool(ratio >= target)
    return d


def fmt(x) -> str:
    if x is None:
        return ""
    a = abs(x)
    return f"{x:.3g}" if a < 10 else f"{x:.1f}" if a < 1000 else f"{x:,.0f}"

