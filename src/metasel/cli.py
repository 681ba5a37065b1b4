"""Command line: `metasel run NAME`, `metasel report DIR`, `metasel forecast PATH`, `metasel list`.

`metasel run NAME --set key=value` overrides any config field (typed by the field, nested fields and
dataset options by dotted paths); `--resume RUN_DIR` continues a killed run with the settings it was
started with; `--devices N` splits batches over N devices; `--coordinator ADDR --num-processes N
--process-id I` joins a multi-host run (every host runs the same command, with the same `--run-id`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from metasel import configs, runs

COMMAND_FILE = "command.json"  # the arguments a run folder was started with, read back by --resume
SETTINGS = ("name", "quick", "seeds", "dataset", "model", "set")  # the arguments that make the config
PLACES = ("out", "run_id")  # where a new run goes; --resume names its folder instead


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
  run.add_argument("--out", help="results root folder (default: results)")
  run.add_argument("--run-id", help="name of the run folder (default: a timestamp); never overwritten")
  run.add_argument(
      "--set", action="append", default=[], metavar="KEY=VALUE",
      help="override a config field, typed by the field (repeatable), e.g. warmup.epochs=2 or dataset_options.n_real=200",
  )
  run.add_argument(
      "--resume", type=Path, metavar="RUN_DIR",
      help="continue a killed run in RUN_DIR with the settings it was started with; finished units are kept",
  )
  run.add_argument("--devices", type=int, help="split each batch over this many devices (CPU: forced host devices)")
  run.add_argument("--coordinator", help="multi-host: the coordinator's HOST:PORT (jax.distributed)")
  run.add_argument("--num-processes", type=int, help="multi-host: the number of processes")
  run.add_argument("--process-id", type=int, help="multi-host: this process's index")
  report = sub.add_parser("report", help="print the summary table of a run folder")
  report.add_argument("run_dir", type=Path)
  forecast = sub.add_parser("forecast", help="forecast where runs are going from their per-epoch metrics")
  forecast.add_argument("path", type=Path, help="a metasel run folder, or a .jsonl or .csv file of per-epoch metrics")
  forecast.add_argument("--cutoff", type=int, help="forecast from this epoch (default: the last, within the forecaster's cutoffs)")
  forecast.add_argument("--by", help="comma-separated columns that tell runs apart in a CSV (e.g. seed,lr)")
  forecast.add_argument("--corpus", type=Path, help="retrain the forecaster on this forecast-corpus run folder instead of the shipped one")
  forecast.add_argument("--forecaster", type=Path, help="a forecaster.json to use instead of the shipped one")
  forecast.add_argument("--plot", type=Path, help="where to write the plot (default: forecast.png beside the metrics)")
  forecast.add_argument(
      "--features", default="curve", choices=("curve", "full"),
      help="curve (default) or full: the curve and the per-sample summaries (signals/NAME columns)",
  )
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
  return configs.apply_overrides(dataclasses.replace(config, **changes), args.set)


def _resumed_arguments(args) -> argparse.Namespace:
  """The arguments `--resume RUN_DIR` was started with, with this command's devices and processes."""
  given = [f"--{key.replace('_', '-')}" for key in SETTINGS[1:] + PLACES if getattr(args, key) not in (None, False, [])]
  if given:
    raise ValueError(f"--resume takes the settings and folder the run was started with; drop {', '.join(given)}")
  path = args.resume / COMMAND_FILE
  if not path.exists():
    raise FileNotFoundError(f"no {COMMAND_FILE} in {args.resume}; expected a run folder made by `metasel run`")
  started = json.loads(path.read_text())
  if started["name"] != args.name:
    raise ValueError(f"{args.resume} is a run of {started['name']!r}, not {args.name!r}")
  return argparse.Namespace(**{**vars(args), **started})


def _start_devices(args) -> None:
  """Join the multi-host run and force CPU host devices, before JAX starts its backends."""
  if args.devices is not None and args.devices < 1:
    raise ValueError(f"--devices must be a positive integer, got {args.devices}")
  distributed = (args.coordinator, args.num_processes, args.process_id)
  if any(value is not None for value in distributed):
    if any(value is None for value in distributed) or args.run_id is None and args.resume is None:
      raise ValueError(
          "a multi-host run needs --coordinator, --num-processes, --process-id and the same --run-id on every host"
      )
    from metasel import parallel

    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.devices is not None:
    import jax

    if args.devices > jax.config.jax_num_cpu_devices:  # only the CPU backend reads it
      try:
        jax.config.update("jax_num_cpu_devices", args.devices)
      except RuntimeError:
        raise ValueError(
            f"--devices {args.devices} needs JAX_NUM_CPU_DEVICES={args.devices} set before JAX starts in this process"
        ) from None


# Config fields whose sizes are split over devices: training batches (any `*batch_size(s)` or `*_batch` but
# the validation and scoring batches, which are not split), GSNR batch counts and DVN probes.
BATCH_FIELDS = re.compile(r"^(?!val_|score_)(\w*batch_sizes?|\w+_batch|num_batches|num_samples)$")


def _check_devices(config, devices: int, path: str = "") -> None:
  """Raise a clear error, before any compute, for a batch-size field of `config` that does not divide over the devices."""
  from metasel import parallel

  for field in dataclasses.fields(config):
    value, name = getattr(config, field.name), f"{path}{field.name}"
    if dataclasses.is_dataclass(value):
      _check_devices(value, devices, f"{name}.")
    elif BATCH_FIELDS.match(field.name):
      for size in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(size, int) and not isinstance(size, bool):
          parallel.check_divides(size, devices, f"config field {name}")


def _mesh(args):
  """The data mesh of `--devices N` (every device of a multi-host run), or None without one."""
  if args.devices is None and args.num_processes is None:
    return None
  import jax

  from metasel import parallel

  if args.num_processes is not None and args.devices not in (None, jax.device_count()):
    raise ValueError(
        f"--devices {args.devices} in a multi-host run of {jax.device_count()} devices; a multi-host run uses every"
        " device of every process, so leave --devices out"
    )
  return parallel.data_mesh(args.devices)


def _use_mesh(mesh):
  """`parallel.use_mesh`, imported here so that JAX starts only after `_start_devices`."""
  from metasel import parallel

  return parallel.use_mesh(mesh)


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
    if args.command == "forecast":
      from metasel.forecast import tool

      by = tuple(c.strip() for c in args.by.split(",")) if args.by else None
      print(tool.command(args.path, args.cutoff, by, args.corpus, args.forecaster, args.plot, args.features))
      return 0
    _start_devices(args)
    settings = _resumed_arguments(args) if args.resume else args
    module = _experiments().get(args.name)
    config = _configure(module, settings)
    module.check(config)
    mesh = _mesh(args)
    if mesh is not None:
      _check_devices(config, mesh.devices.size)
    if args.resume:
      out_dir = args.resume
    else:
      out_dir = runs.new_run_dir(args.out or "results", args.name, args.run_id)
      runs.write_json(out_dir / COMMAND_FILE, {key: getattr(args, key) for key in SETTINGS})
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"metasel: error: {err}", file=sys.stderr)
    return 2
  print(f"metasel: {'resuming' if args.resume else 'running'} {args.name} -> {out_dir}", file=sys.stderr)
  with _use_mesh(mesh):
    summary = module.run(config, out_dir)
  if runs.writes():
    print(summary.get("table", ""))
    print(f"\nresults in {out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
