"""Scores as MuCUE's leaderboard forms them, and the report files.

- An item is correct when its predicted letter equals ``correct_choice``; an item that could not be
  asked (an error record) counts as wrong and is listed under ``errors``, so a subset's ``n`` is
  always its number of items.
- A subset's accuracy is the fraction of its items that are correct; ``ci95`` is the Wilson score
  interval (well behaved at 0 and 1 and for small subsets, unlike the normal approximation).
- A model's ``average`` is the mean of its subsets' accuracies, not of items (the leaderboard's
  65.7 for MuFun is such a mean over 26 subsets).
- The first two models are compared item by item with McNemar's exact test (two-sided binomial on
  the discordant pairs): the same items, so a paired test is the right one.

In ``both`` mode the likelihood accuracy is reported beside the generated one
(``likelihood_accuracy``, ``likelihood_ci95``, ``likelihood_average``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.959963984540054) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarize(records: list[dict], models: list[str], subsets: list[str], mode: str = "generate") -> dict:
    """``answers.jsonl`` records -> the ``results.json`` object (module docstring)."""
    out = {"models": {}}
    for m in models:
        subs = {}
        for s in subsets:
            recs = [r for r in records if r["model"] == m and r["subset"] == s]
            n = len(recs)
            k = sum(bool(r.get("correct")) for r in recs)
            entry = {"n": n, "accuracy": k / n if n else None, "ci95": wilson(k, n),
                     "errors": sum(r.get("error") is not None for r in recs)}
            if mode == "both":
                kl = sum(bool(r.get("likelihood_correct")) for r in recs)
                entry.update(likelihood_accuracy=kl / n if n else None, likelihood_ci95=wilson(kl, n))
            subs[s] = entry
        accs = [e["accuracy"] for e in subs.values() if e["accuracy"] is not None]
        out["models"][m] = {"subsets": subs, "average": sum(accs) / len(accs) if accs else None}
        if mode == "both":
            la = [e["likelihood_accuracy"] for e in subs.values() if e["likelihood_accuracy"] is not None]
            out["models"][m]["likelihood_average"] = sum(la) / len(la) if la else None
    out["mode"] = mode
    if len(models) >= 2:
        out["paired"] = paired(records, models[0], models[1], subsets)
    return out


def paired(records, a: str, b: str, subsets) -> dict:
    """Per subset and overall: ``b_only`` / ``a_only`` right counts and the McNemar p-value."""
    right = {(r["model"], r["subset"], json.dumps(r["id"])): bool(r.get("correct")) for r in records}
    out = {}
    tot_a = tot_b = 0
    for s in subsets:
        keys = {k[2] for k in right if k[1] == s and k[0] == a} & {k[2] for k in right if k[1] == s and k[0] == b}
        only_a = sum(right[(a, s, k)] and not right[(b, s, k)] for k in keys)
        only_b = sum(right[(b, s, k)] and not right[(a, s, k)] for k in keys)
        tot_a, tot_b = tot_a + only_a, tot_b + only_b
        out[s] = {"a_only": only_a, "b_only": only_b, "p": mcnemar_exact(only_a, only_b)}
    out["all"] = {"a_only": tot_a, "b_only": tot_b, "p": mcnemar_exact(tot_a, tot_b)}
    return out


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    models = list(results["models"])
    subsets = list(next(iter(results["models"].values()))["subsets"]) if models else []
    both = results.get("mode") == "both"
    head = ["subset", "n"] + [m + (" (gen / ll)" if both else "") for m in models]
    pair = len(models) >= 2
    if pair:
        head += [f"{models[1]} − {models[0]}", "McNemar p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(e):
        s = f"{_pct(e['accuracy'])} [{_pct(e['ci95'][0])}, {_pct(e['ci95'][1])}]"
        if both:
            s += f" / {_pct(e['likelihood_accuracy'])}"
        return s + (f" ({e['errors']} err)" if e["errors"] else "")

    for s in subsets:
        es = [results["models"][m]["subsets"][s] for m in models]
        row = [s, str(es[0]["n"])] + [cell(e) for e in es]
        if pair:
            d = None if None in (es[0]["accuracy"], es[1]["accuracy"]) else es[1]["accuracy"] - es[0]["accuracy"]
            row += ["—" if d is None else f"{100 * d:+.1f}", f"{results['paired'][s]['p']:.3g}"]
        lines.append("| " + " | ".join(row) + " |")
    avg = ["**average**", ""] + [_pct(results["models"][m]["average"]) + (
        f" / {_pct(results['models'][m]['likelihood_average'])}" if both else "") for m in models]
    if pair:
        a0, a1 = results["models"][models[0]]["average"], results["models"][models[1]]["average"]
        avg += ["—" if None in (a0, a1) else f"{100 * (a1 - a0):+.1f}",
                f"{results['paired']['all']['p']:.3g} (items)"]
    lines.append("| " + " | ".join(avg) + " |")
    note = ("\nAccuracy in % with the Wilson 95% interval; the average is the mean of the subset accuracies "
            "(as MuCUE's leaderboard). Error items count as wrong.")
    if pair:
        note += (f" The paired test is McNemar's exact test on the items where exactly one of {models[0]} and "
                 f"{models[1]} is right.")
    return "\n".join(lines) + "\n" + note + "\n"


def plot(results: dict, path) -> None:
    import matplotlib  # optional heavy dependency, imported only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    subsets = list(next(iter(results["models"].values()))["subsets"]) if models else []
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(subsets) * max(1, len(models)) + 2), 4.5))
    w = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        accs = [100 * (results["models"][m]["subsets"][s]["accuracy"] or 0) for s in subsets]
        ci = [results["models"][m]["subsets"][s]["ci95"] for s in subsets]
        err = [[max(0.0, a - 100 * c[0]) for a, c in zip(accs, ci)],
               [max(0.0, 100 * c[1] - a) for a, c in zip(accs, ci)]]
        avg = results["models"][m]["average"]
        ax.bar([i + (j - (len(models) - 1) / 2) * w for i in range(len(subsets))], accs, w, yerr=err, capsize=2,
               label=f"{m} (avg {_pct(avg)})")
    ax.set_xticks(range(len(subsets)))
    ax.set_xticklabels(subsets, rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("multiple-choice accuracy per subset (95% Wilson intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(results: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir / "results.png")
