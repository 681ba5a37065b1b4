"""The training loop for every data-selection method, on any Flax model and any optax optimiser.

The step itself is public and data-only (`make_step`, from `metasel.step`): a user's own loop feeds it
whatever batches its loader makes. `fit` is one such loop over an in-memory `Dataset`: each epoch is
one compiled `lax.scan` of steps, each drawing its batch on device (a shuffled pass, or the method's
`probs`) and its validation rows. The Python side only logs metrics, shows progress, saves
checkpoints and stops on a NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metasel import adapters, checks, checkpoints as checkpointing, core, parallel, persample, records, signals
from metasel.adapters import Model, ModelLike
from metasel.data import Dataset, sampling
from metasel.step import Step, TrainState, make_step

__all__ = [
    "Step",
    "TrainState",
    "make_step",
    "LoopState",
    "TrainConfig",
    "OPTIMIZERS",
    "make_optimizer",
    "loss_fn_for",
    "make_epoch",
    "evaluate",
    "fit",
    "FitResult",
    "progress_enabled",
]

Optimizer = str | optax.GradientTransformation
DEFAULT_LEARNING_RATE = 1e-3


class LoopState(NamedTuple):
  """`fit`'s carry through the compiled epoch: the step's `TrainState` fields and the loop's key."""

  params: Any
  opt_state: Any
  method_state: Any
  tracker: signals.TrackerState | None
  step: jax.Array
  key: jax.Array


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda learning_rate: optax.sgd(learning_rate),
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    # eps_root keeps derivatives through the step finite where a gradient entry is zero.
    "adam": lambda learning_rate: optax.adam(learning_rate, eps_root=1e-16),
}


# One transformation per name with its learning rate as traced state (`optax.inject_hyperparams`):
# its `update` is one function for every rate, so runs at different rates share one compiled program.
_NAMED = {name: optax.inject_hyperparams(build)(learning_rate=DEFAULT_LEARNING_RATE) for name, build in OPTIMIZERS.items()}


def at_learning_rate(opt_state, learning_rate: float):
  """A named optimiser's state (`make_optimizer`) with its traced learning rate set to `learning_rate`."""
  rate = jnp.asarray(learning_rate, jnp.float32)
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": rate})


@dataclasses.dataclass(frozen=True)
class _InitAtRate:
  """A named optimiser's `init` at one learning rate; equal for equal names and rates."""

  name: str
  learning_rate: float

  def __call__(self, params):
    return at_learning_rate(_NAMED[self.name].init(params), self.learning_rate)


def make_optimizer(optimizer: Optimizer, learning_rate: float | None = None) -> optax.GradientTransformation:
  """The optax optimiser a `TrainConfig` names.

  A name ("sgd", "momentum", "adam") gets `learning_rate` (default 1e-3) as a hyperparameter in its
  state (`optax.inject_hyperparams`), so its `update` is one function for every rate and runs at
  different rates share one compiled program. An optax `GradientTransformation` (schedules included) is
  used as it is and takes no `learning_rate`.
  """
  if isinstance(optimizer, str):
    checks.check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
    rate = DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
    checks.check_positive("learning_rate", rate)
    return optax.GradientTransformation(_InitAtRate(optimizer, float(rate)), _NAMED[optimizer].update)
  if not isinstance(records.built_of(optimizer), optax.GradientTransformation):
    raise ValueError(
        f"optimizer must be one of {tuple(OPTIMIZERS)} or an optax GradientTransformation, got {optimizer!r}"
    )
  if learning_rate is not None:
    raise ValueError(
        "learning_rate applies to a named optimizer; an optax GradientTransformation carries its own"
        f" (got learning_rate={learning_rate!r}); expected learning_rate=None"
    )
  return optimizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of one training run.

  Attributes:
    epochs: evaluation periods; each is one pass over the training pool (`len(train) // batch_size` steps)
      unless `steps_per_epoch` says otherwise.
    batch_size: samples per step.
    val_batch_size: clean validation samples a method sees per step.
    optimizer: "sgd", "momentum", "adam", or any optax `GradientTransformation` (e.g.
      `optax.adamw(optax.cosine_decay_schedule(1e-3, 1000))`).
    learning_rate: the named optimizer's step size (default 1e-3); None with a transformation.
    seed: seeds parameters, batch order and the method.
    track_dynamics: keep the per-sample training-dynamics tracker (`signals.tracker_update`) in the loop.
    steps_per_epoch: steps between evaluations (and checkpoints); default one pass over the pool,
      `len(train) // batch_size`. Batches still walk the pool in shuffled passes
      (`sampling.pass_batches`), so a method's batch size (e.g. a presample) need not change the
      evaluation points.
  """

  epochs: int = 10
  batch_size: int = 64
  val_batch_size: int = 64
  optimizer: Optimizer = "adam"
  learning_rate: float | None = None
  seed: int = 0
  track_dynamics: bool = True
  steps_per_epoch: int | None = None

  def check(self, dataset: Dataset) -> None:
    """Raise a clear ValueError for settings this dataset cannot support, before any compute."""
    for name in ("epochs", "batch_size", "val_batch_size"):
      checks.check_int(name, getattr(self, name))
    checks.check_int("steps_per_epoch", self.steps_per_epoch, allow_none=True)
    checks.check_seed(self.seed)
    for name, split in (("batch_size", dataset.train), ("val_batch_size", dataset.val)):
      if getattr(self, name) > len(split):
        which = "training" if name == "batch_size" else "validation"
        raise ValueError(
            f"{name}={getattr(self, name)} is larger than the {which} split ({len(split)} samples);"
            " expected at most the split size"
        )
    make_optimizer(self.optimizer, self.learning_rate)

  def describe(self) -> dict[str, Any]:
    """The settings as JSON-ready values (a custom optax optimiser is named by its type only)."""
    settings = dataclasses.asdict(self)
    if self.steps_per_epoch is None:
      del settings["steps_per_epoch"]  # the default, as in checkpoints written before the field existed
    if not isinstance(self.optimizer, str):
      settings["optimizer"] = f"optax:{type(records.built_of(self.optimizer)).__name__}"
    return settings


def loss_fn_for(dataset: Dataset) -> persample.LossFn:
  """Cross-entropy for classification datasets, squared error for regression."""
  return persample.squared_error if dataset.task == "regression" else persample.softmax_cross_entropy


def make_epoch(step: Step, val_batch_size: int):
  """Build `fit`'s `epoch(state, data, batch_indices) -> (state, metrics)`: one `lax.scan` of `step`.

  `data` is `(train_x, train_y, val_x, val_y)`, optionally followed by the training samples' groups
  (N,) (`Split.groups`, shown to methods as `Batch.groups`); `batch_indices` (S, B) are the uniform
  epoch's batches (ignored when the method samples from its own `probs`). Each step splits the loop's
  key into the next one, the batch draw's, the validation rows' and the step's own, gathers its batch
  and `val_batch_size` validation rows drawn without replacement, and runs `step.step`, given the pool
  when the method needs it. Metrics are stacked over steps.
  """

  def one_step(data: tuple, state: LoopState, batch_indices: jax.Array):
    train_x, train_y, val_x, val_y, *groups = data
    key, batch_key, val_key, step_key = jax.random.split(state.key, 4)
    if step.method.probs is not None:
      batch_indices = sampling.weighted_batches(batch_key, step.method.probs(state.method_state), batch_indices.shape[0], 1)[0]
    batch = core.Batch(batch_indices, train_x[batch_indices], train_y[batch_indices], groups[0][batch_indices] if groups else None)
    val_rows = core.validation_rows(val_key, val_x.shape[0], val_batch_size)
    pool = (train_x, train_y) if step.method.needs_pool else None
    train_state, metrics = step.step(TrainState(*state[:5]), batch, (val_x[val_rows], val_y[val_rows]), step_key, pool=pool)
    return LoopState(*train_state[:5], key), metrics

  def epoch(state: LoopState, data: tuple, batch_indices: jax.Array):
    return jax.lax.scan(functools.partial(one_step, data), state, batch_indices)

  return epoch


def evaluate(model: ModelLike, loss_fn: persample.LossFn, params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Mean loss and (for integer targets) accuracy of `params` on all of (x, y)."""
  outputs = persample.outputs(model, params, x)
  result = {"loss": jnp.mean(loss_fn(outputs, y))}
  if jnp.issubdtype(y.dtype, jnp.integer):
    result["accuracy"] = jnp.mean(jnp.argmax(outputs, axis=-1) == y)
  return result


@functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=3)
def _fit_epoch(step: Step, val_batch_size: int, mesh, state: LoopState, data: tuple, batch_indices: jax.Array):
  """`fit`'s compiled epoch; on a mesh its outputs are pinned replicated, as `fit` puts its inputs, so the
  next epoch runs the same program. Steps of one structure share it: the step is an argument, its
  method's per-run arrays traced inputs."""
  out = make_epoch(step, val_batch_size)(state, data, batch_indices)
  return out if mesh is None else jax.lax.with_sharding_constraint(out, parallel.replicated(mesh))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fit_evaluate(model: Model, loss_fn, mesh, params, x, y):
  out = evaluate(model, loss_fn, params, x, y)
  return out if mesh is None else jax.lax.with_sharding_constraint(out, parallel.replicated(mesh))


def progress_enabled() -> bool:
  """Show progress bars on a terminal, never in CI or when output is redirected."""
  return sys.stderr.isatty() and not os.environ.get("CI")


def _epochs(done: int, epochs: int, name: str):
  """The epochs still to run, with a progress bar on a terminal of the main process when tqdm is installed."""
  if not progress_enabled() or not parallel.is_main_process() or importlib.util.find_spec("tqdm") is None:
    return range(done, epochs)
  import tqdm  # from the experiments extra; the core install trains without a bar

  return tqdm.trange(done, epochs, initial=done, total=epochs, desc=name, leave=False)


class FitResult(NamedTuple):
  """The final loop state and the per-epoch evaluation history."""

  state: LoopState
  history: list[dict[str, Any]]


def fit_step(model: Model, dataset: Dataset, config: TrainConfig, method: core.Method, loss_fn) -> Step:
  """The step `fit` runs: a named optimiser's one transformation for every rate (the rate is set in its state)."""
  named = isinstance(config.optimizer, str)
  tx = _NAMED[config.optimizer] if named else config.optimizer
  return make_step(model, loss_fn, tx, method, num_train=len(dataset.train), track_dynamics=config.track_dynamics)


def _initial_state(step: Step, dataset: Dataset, config: TrainConfig, params, keys) -> LoopState:
  """The loop state before the first epoch: params (given, or the model's init), optimiser, method, tracker."""
  init_key, method_key, loop_key = keys
  if params is None:
    params = adapters.init(step.model, init_key, dataset.input_shape, dataset.train.x.dtype)
  else:
    adapters.check_params(step.model, params, dataset.input_shape, dataset.train.x.dtype)
  state = step.init(method_key, params)
  if isinstance(config.optimizer, str):
    rate = DEFAULT_LEARNING_RATE if config.learning_rate is None else config.learning_rate
    state = state._replace(opt_state=at_learning_rate(state.opt_state, rate))
  # The state is donated to each epoch; give every leaf its own buffer, since inits may share one.
  return jax.tree.map(jnp.copy, LoopState(*state[:5], loop_key))


def _epoch_record(epoch: int, state: LoopState, step_metrics: dict, eval_fn, splits: dict) -> dict[str, Any]:
  """The epoch's log line: mean step metrics and the validation and test evaluation."""
  record = {"epoch": epoch + 1, "step": int(state.step)}
  record.update({f"train/{k}": float(np.mean(v)) for k, v in step_metrics.items()})
  for name, (x, y) in splits.items():
    record.update({f"{name}/{k}": float(v) for k, v in eval_fn(state.params, x, y).items()})
  return record


def _check_finite_loss(step_metrics: dict, state: LoopState, epoch: int) -> None:
  losses = step_metrics["loss"]
  if not np.all(np.isfinite(losses)):
    bad = int(np.argmin(np.isfinite(losses)))
    raise FloatingPointError(
        f"training loss became non-finite at step {int(state.step) - len(losses) + bad + 1}"
        f" (epoch {epoch + 1}); metrics up to this epoch were logged. Lower the learning rate or check the data."
    )


def _epoch_indices(order_key: jax.Array, epoch: int, num_train: int, config: TrainConfig) -> jax.Array:
  """The uniform batches (S, B) of one epoch: a shuffled pass, or `steps_per_epoch` steps of a stream of passes."""
  if config.steps_per_epoch is None:
    return sampling.epoch_batches(jax.random.fold_in(order_key, epoch), num_train, config.batch_size)
  steps = config.steps_per_epoch
  return sampling.pass_batches(order_key, num_train, config.batch_size, epoch * steps, steps)


def fit(
    model: ModelLike,
    dataset: Dataset,
    config: TrainConfig,
    method: core.Method | None = None,
    *,
    loss_fn: persample.LossFn | None = None,
    params: Any = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
  """Train `model` on `dataset` with `method` (uniform by default); returns the state and history.

  `model` is a Flax linen or NNX module or an `apply(params, x)` function; `loss_fn` the per-sample
  loss (default the dataset's, `loss_fn_for`); `params` are the starting parameters (default: the
  model's init with `config.seed`; an NNX module starts from its own, and a function needs them
  given). Each epoch is one compiled scan of `make_step`'s step. After every epoch the validation and
  test loss (and accuracy) are evaluated and passed to `log` together with the mean of the step
  metrics; per-step metrics are passed every `log_every` steps. A non-finite loss stops training with a
  FloatingPointError after everything up to that epoch has been logged.

  With `checkpoint_dir`, the state and history are saved there after every epoch, and a run that
  finds a checkpoint continues from it: it ends with the same numbers as an uninterrupted run, also
  when it was saved on another number of devices or processes.

  With a data `mesh` (`parallel.data_mesh`; default: the mesh set with `jax.set_mesh`, if any) each
  batch is split over its devices and params, optimiser and method state are replicated; the batch
  size must divide over the devices. Batches, samples drawn from a method's `probs` and the numbers
  are those of one device, up to the order of floating-point sums.
  """
  mesh = _check_fit(dataset, config, mesh, log_every)
  step = fit_step(adapters.as_model(model), dataset, config, method or core.uniform(), loss_fn or loss_fn_for(dataset))
  init_key, method_key, loop_key, order_key = jax.random.split(jax.random.key(config.seed), 4)
  state = _initial_state(step, dataset, config, params, (init_key, method_key, loop_key))
  state, data, splits = parallel.replicate((state, *_device_data(dataset)), mesh)
  epoch_fn = functools.partial(_fit_epoch, step, config.val_batch_size, mesh)
  eval_fn = functools.partial(_fit_evaluate, step.model, step.loss_fn, mesh)
  settings = {k: v for k, v in config.describe().items() if k != "epochs"}  # all but epochs must match to continue
  checkpoints = None if checkpoint_dir is None else checkpointing.Checkpoints(checkpoint_dir, settings)
  history = []
  if checkpoints is not None and (restored := checkpoints.restore(state)) is not None:
    state, history = restored
  bar = _epochs(len(history), config.epochs, step.method.name)
  with parallel.use_mesh(mesh):
    for epoch in bar:
      batches = parallel.replicate(_epoch_indices(order_key, epoch, len(dataset.train), config), mesh)
      state, step_metrics = epoch_fn(state, data, batches)
      step_metrics = jax.device_get(step_metrics)
      record = _epoch_record(epoch, state, step_metrics, eval_fn, splits)
      _log_epoch(log, log_every, record, step_metrics, int(state.step) - len(batches))
      history.append(record)
      if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{record['train/mean_loss']:.3f}")
      _check_finite_loss(step_metrics, state, epoch)
      if checkpoints is not None:
        checkpoints.save(epoch + 1, state, history)
  return FitResult(state, history)


def _device_data(dataset: Dataset) -> tuple[tuple, dict]:
  """The epoch's `data` (train x, y, val x, y, train groups) and the evaluated splits, as device arrays."""
  splits = (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y, dataset.train.groups)
  evaluated = {name: (jnp.asarray(getattr(dataset, name).x), jnp.asarray(getattr(dataset, name).y)) for name in ("val", "test")}
  return tuple(jnp.asarray(a) for a in splits), evaluated


def _check_fit(dataset: Dataset, config: TrainConfig, mesh, log_every: int):
  """Check `fit`'s arguments before any compute; the data mesh it runs on (or None)."""
  config.check(dataset)
  mesh = parallel.resolve_mesh(mesh)
  if mesh is not None:
    parallel.check_divides(config.batch_size, parallel.mesh_size(mesh), "batch_size")
  for split_name in ("train", "val", "test"):
    checks.check_finite_rows(f"{split_name} features", getattr(dataset, split_name).x)
  checks.check_int("log_every", log_every)
  return mesh


def _log_epoch(log, log_every: int, record: dict, step_metrics: dict, first_step: int) -> None:
  """Pass every `log_every`-th step's metrics, then the epoch's record, to `log`."""
  if log is None:
    return
  for i in range(0, len(step_metrics["loss"]), log_every):
    log({"step": first_step + i + 1, **{f"step/{k}": float(v[i]) for k, v in step_metrics.items()}})
  log(record)
