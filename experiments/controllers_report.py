"""The controllers experiment's verdicts, conclusions, tables and figure, from its per-cell results."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from metasel import runs, stats
from metasel_experiments import ci_text
from metasel_experiments.controllers_arms import CONTROLS, INTERVENTIONS, METRICS

SHORT_METRICS = {"accuracy": "final acc", "aulc": "AULC", "steps": "steps to 95%"}


def _compared(cells: dict) -> list[tuple[str, str]]:
  return [(key, arm) for key, cell in cells.items() for arm in cell["arms"] if arm != "uniform"]


def with_verdicts(cells: dict, alpha: float) -> dict:
  """The cells with Holm-adjusted one-sided p-values and a verdict per arm and metric.

  One Holm family per direction covers every metric x arm x cell, since the claim fails on a gain in any of
  them. TOST p-values are not adjusted: "equivalent" must hold in each comparison on its own. Steps to 95%
  of an arm with censored seeds (counted at the budget, in the arm's favour) cannot be called equivalent or
  better: those verdicts become "inconclusive".
  """
  cells = copy.deepcopy(cells)
  tests = [(k, a, m) for k, a in _compared(cells) for m in METRICS]
  for side in ("p_superior", "p_inferior"):
    adjusted = stats.holm([cells[k]["arms"][a][side][m] for k, a, m in tests], alpha)
    for (key, arm, metric), p in zip(tests, adjusted):
      cells[key]["arms"][arm].setdefault(f"{side}_holm", {})[metric] = float(p)
  for key, arm in _compared(cells):
    entry = cells[key]["arms"][arm]
    entry["verdict"] = {
        m: stats.comparison_verdict(entry["p_superior_holm"][m], entry["p_inferior_holm"][m], entry["p_tost"][m], alpha)
        for m in METRICS
    }
    if entry["censored"] and entry["verdict"]["steps"] in stats.VERDICTS[:2]:
      entry["verdict"]["steps"] = "inconclusive"
  return cells


def _verdicts(cells: dict, arm: str) -> list[str]:
  return [v for cell in cells.values() if arm in cell["arms"] for v in cell["arms"][arm].get("verdict", {}).values()]


def arm_summary(cells: dict, arm: str) -> dict[str, Any]:
  """An arm's verdict counts over cells x metrics, and whether it beats uniform anywhere."""
  verdicts = _verdicts(cells, arm)
  counts = {v: verdicts.count(v) for v in stats.VERDICTS}
  return {"counts": counts, "beats_anywhere": counts["beats uniform"] > 0, "of": len(verdicts)}


def claim_status(counts: dict[str, int]) -> str:
  """The essay's claim for a set of comparisons: "fails" on any gain, "holds" when every one is equivalent or worse,
  else "not shown" (no gain found, but some comparisons cannot tell)."""
  if counts["beats uniform"]:
    return "fails"
  if counts["inconclusive"]:
    return "not shown"
  return "holds"


def conclusions(summary: dict) -> dict[str, Any]:
  """Whether the essay's claim (no intervention beats uniform) holds here, arm by arm, and what the controls say."""
  cells = summary["cells"]
  arms = sorted({a for _, a in _compared(cells)})
  per_arm = {arm: {**arm_summary(cells, arm)} for arm in arms}
  for entry in per_arm.values():
    entry["claim"] = claim_status(entry["counts"])
  out: dict[str, Any] = {"arms": per_arm, "interventions": {}}
  for name, members in INTERVENTIONS.items():
    present = [a for a in members if a in per_arm]
    if present:
      counts = {v: sum(per_arm[a]["counts"][v] for a in present) for v in stats.VERDICTS}
      out["interventions"][name] = {
          "arms": present, "counts": counts, "claim": claim_status(counts), "by_metric": metric_counts(cells, present),
      }
  if "random-scores" in per_arm:
    entry = per_arm["random-scores"]
    out["negative_control"] = {
        "counts": entry["counts"],
        "no_difference_found": entry["counts"]["beats uniform"] == 0 and entry["counts"]["worse"] == 0,
        "equivalent_everywhere": entry["counts"]["equivalent to uniform"] == entry["of"],
    }
  if "control" in summary:
    control = summary["control"]
    helps = sorted({a for cell in control.values() for a, e in cell["arms"].items() if "beats uniform" in e.get("verdict", {}).values()})
    out["positive_control"] = {"helping_arms": helps, "any_helps": bool(helps)}
  return out


def seeds_needed(cells: dict) -> dict[str, dict]:
  """From the pilot seeds: per metric, the median and largest number of seeds TOST needs (80% power at no true
  difference) over every arm x cell, and the share of arm x cells that the run's seeds cover."""
  out = {}
  for metric in METRICS:
    values = [cell["arms"][a]["pilot_seeds_needed"][metric] for cell in cells.values() for a in cell["arms"] if a != "uniform"]
    finite = [v if v is not None else np.inf for v in values]
    out[metric] = {"median": float(np.median(finite)), "max": float(np.max(finite)), "values": values}
  return out


def _cell_lines(key: str, cell: dict, margins: dict) -> list[str]:
  head = f"{'arm':<26}{'final acc %':>16}{'d acc (pts)':>16}{'d AULC (pts)':>16}{'steps ratio':>14}  verdicts (acc / AULC / steps)"
  lines = [f"{cell['dataset'].rsplit('/', 2)[-2] if '/' in cell['dataset'] else cell['dataset']} / {cell['scale']}", head, "-" * len(head)]
  for arm, e in cell["arms"].items():
    if arm == "uniform":
      lines.append(f"{arm:<26}{ci_text(e['accuracy'], 100):>16}")
      continue
    d = e["differences"]
    ratio = np.exp(-d["steps"]["mean"])  # arm steps / uniform steps (geometric mean)
    verdicts = " / ".join(e["verdict"][m] for m in METRICS)
    censored = f" ({e['censored']} censored)" if e["censored"] else ""
    lines.append(
        f"{arm:<26}{ci_text(e['accuracy'], 100):>16}{ci_text(d['accuracy'], 100, True):>16}"
        f"{ci_text(d['aulc'], 100, True):>16}{ratio:>14.3f}  {verdicts}{censored}"
    )
  return lines + [""]


def _signal_effect_lines(effects: dict) -> list[str]:
  """One line per cell and arm: the arm against its no-information control."""
  head = f"{'cell':<26}{'arm - its control':<46}{'d acc (pts)':>16}{'d AULC (pts)':>16}  verdicts (acc / AULC / steps)"
  lines = ["signal against its no-information control (same machinery, random order or scores)", head, "-" * len(head)]
  for cell in effects.values():
    name = f"{Path(cell['dataset']).parent.name or cell['dataset']}/{cell['scale']}"
    for arm, e in cell["arms"].items():
      verdicts = " / ".join(e["verdict"][m].replace("uniform", "control") for m in METRICS)
      lines.append(
          f"{name:<26}{arm + ' - ' + e['control']:<46}{ci_text(e['differences']['accuracy'], 100, True):>16}"
          f"{ci_text(e['differences']['aulc'], 100, True):>16}  {verdicts}"
      )
  return lines + [""]


def metric_counts(cells: dict, arms) -> dict[str, dict[str, int]]:
  """Verdict counts per metric over the given arms and every cell."""
  return {
      m: {v: sum(cell["arms"][a]["verdict"][m] == v for cell in cells.values() for a in arms if a in cell["arms"]) for v in stats.VERDICTS}
      for m in METRICS
  }


def format_table(summary: dict) -> str:
  """Text tables per cell, the control cell, each signal against its control, and the conclusions arm by arm."""
  lines = []
  for key, cell in summary["cells"].items():
    lines += _cell_lines(key, cell, summary["margins"])
  if summary.get("signal_effects"):
    lines += _signal_effect_lines(summary["signal_effects"])
  if "control" in summary:
    lines.append("positive control (label noise, short budget)")
    for key, cell in summary["control"].items():
      lines += _cell_lines(key, cell, summary["margins"])
  c = summary["conclusions"]
  lines.append(
      "essay's claim (no intervention beats uniform) over cells x metrics: holds = equivalent or worse in every"
      " comparison; not shown = no gain, but some comparisons inconclusive; fails = a gain somewhere"
  )
  for name, e in c["interventions"].items():
    counts = ", ".join(f"{v}: {n}" for v, n in e["counts"].items() if n)
    lines.append(f"  {name:<30} claim {e['claim']:<10} ({counts})")
    for metric, by in e["by_metric"].items():
      lines.append(f"  {'':<32}{SHORT_METRICS[metric] + ':':<14} " + ", ".join(f"{v}: {n}" for v, n in by.items() if n))
  lines.append("per arm:")
  for arm, e in c["arms"].items():
    counts = ", ".join(f"{v}: {n}" for v, n in e["counts"].items() if n)
    lines.append(f"  {arm:<30} {e['claim']:<10} ({counts}){'  ' + CONTROLS[arm] if arm in CONTROLS else ''}")
  if "negative_control" in c:
    n = c["negative_control"]
    lines.append(
        f"negative control (random scores): no difference found: {n['no_difference_found']}; equivalence shown in"
        f" {n['counts']['equivalent to uniform']} of {sum(n['counts'].values())} comparisons"
    )
  if "positive_control" in c:
    helping = ", ".join(c["positive_control"]["helping_arms"]) or "none"
    lines.append(f"positive control: arms that beat uniform under label noise: {helping}")
  if "seeds_needed" in summary:
    needed = "; ".join(f"{SHORT_METRICS[k]} median {v['median']:g}, max {v['max']:g}" for k, v in summary["seeds_needed"].items())
    lines.append(f"seeds TOST needs for 80% power at no true difference, from the pilot seeds' spread: {needed}")
  m = summary["margins"]
  lines.append(
      f"mean +- 95% CI over {len(summary['seeds'])} paired seeds; d = arm - uniform; steps ratio = arm / uniform steps to"
      f" 95% of uniform's final accuracy; TOST margins {100 * m['accuracy']:.1f} pts (acc), {100 * m['aulc']:.1f} pts"
      f" (AULC), {np.expm1(m['steps']):.0%} (steps); one-sided tests Holm-corrected."
  )
  return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
  """Forest plots: per cell (columns) and metric (rows), each arm's paired difference with its 95% CI and the margins."""
  plt = runs.pyplot()
  cells = {**summary["cells"], **summary.get("control", {})}
  fig, axes = plt.subplots(len(METRICS), len(cells), figsize=(3.2 * len(cells), 2.6 * len(METRICS) + 1), squeeze=False)
  for col, (key, cell) in enumerate(cells.items()):
    arms = [a for a in cell["arms"] if a != "uniform"]
    for row, metric in enumerate(METRICS):
      ax = axes[row, col]
      means = np.array([cell["arms"][a]["differences"][metric]["mean"] for a in arms])
      halves = np.nan_to_num([cell["arms"][a]["differences"][metric]["half_width"] for a in arms])
      ax.errorbar(means, np.arange(len(arms)), xerr=halves, fmt="o", ms=3)
      margin = summary["margins"][metric]
      ax.axvspan(-margin, margin, color="green", alpha=0.12)
      ax.axvline(0, color="k", lw=0.6)
      ax.set_yticks(np.arange(len(arms)), arms if col == 0 else [""] * len(arms), fontsize=7)
      ax.set_xlabel(f"d {SHORT_METRICS[metric]}" + (" (log)" if metric == "steps" else ""), fontsize=8)
      if row == 0:
        ax.set_title(("control: " if key.startswith("control/") else "") + f"{Path(cell['dataset']).parent.name or cell['dataset']} / {cell['scale']}", fontsize=8)
  fig.suptitle(f"controllers - uniform, {len(summary['seeds'])} paired seeds (95% CI; green: equivalence margin)")
  runs.save_figure(fig, path)
