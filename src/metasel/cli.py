"""Command line: `metasel run NAME`, `metasel report DIR`, `metasel list`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from metasel import runs


def _experiments():
  import metasel_experiments

  return metasel_experiments


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="metasel", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run an experiment and write results/<experiment>/<run-id>/")
  run.add_argument("name", help="experiment name; `metasel list` shows them")
  run.add_argument("--quick", action="store_true", help="tiny setting (seconds), same code path")
  run.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the experiment's)")
  run.add_argument("--dataset", help="dataset spec, e.g. mixture, digits-synthetic, csv:PATH")
  run.add_argument("--model", help="model, e.g. mlp or cnn (experiments that train one)")
  run.add_argument("--out", default="results", help="results root folder (default: results)")
  run.add_argument("--run-id", help="name of the run folder (default: a timestamp); never overwritten")
  report = sub.add_parser("report", help="print the summary table of a run folder")
  report.add_argument("run_dir", type=Path)
  sub.add_parser("list", help="list the experiments")
  return parser


def _configure(module, args) -> object:
  """The experiment's config with the command-line overrides applied (checked before any compute)."""
  config = module.get_config(quick=args.quick)
  changes = {}
  if args.seeds:
    changes["seeds"] = tuple(args.seeds)
  if args.dataset:
    # Dataset options belong to the default dataset; another dataset starts from its own defaults.
    changes.update(dataset=args.dataset, dataset_options={})
  if args.model:
    changes["model"] = args.model
  for key in changes:
    if not hasattr(config, key):
      raise ValueError(f"experiment {args.name!r} has no setting {key!r}")
  return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "list":
      for name in sorted(_experiments().REGISTRY):
        print(name)
      return 0
    if args.command == "report":
      summary_path = args.run_dir / "summary.json"
      if not summary_path.exists():
        raise FileNotFoundError(f"no summary.json in {args.run_dir}; expected a finished run folder")
      summary = json.loads(summary_path.read_text())
      print(summary.get("table") or json.dumps(summary, indent=2))
      return 0
    module = _experiments().get(args.name)
    config = _configure(module, args)
    module.check(config)
    out_dir = runs.new_run_dir(args.out, args.name, args.run_id)
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"metasel: error: {err}", file=sys.stderr)
    return 2
  print(f"metasel: running {args.name} -> {out_dir}", file=sys.stderr)
  summary = module.run(config, out_dir)
  print(summary.get("table", ""))
  print(f"\nresults in {out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
