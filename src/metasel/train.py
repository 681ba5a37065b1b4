"""One training loop for every data-selection method, on any Flax model and any optax optimiser.

A method (`metasel.core.Method`) gives each batch's per-sample weights and, optionally, the sampling
distribution over the pool. One epoch is one compiled program: a `lax.scan` over its steps, each step
drawing its batch on device, weighting the per-sample losses, taking an optax step, letting the method
make its state transition and (optionally) updating a per-sample training-dynamics tracker. The
Python side only logs metrics, shows progress, saves checkpoints and stops on a NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from metasel import adapters, checks, checkpoints as checkpointing, core, parallel, persample, signals, tape
from metasel.adapters import Model, ModelLike
from metasel.data import Dataset, sampling
from metasel.numerics import safe_divide

__all__ = [
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
  """Everything that changes during training, carried through the compiled epoch (tracker None when off)."""

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


@functools.cache
def _named_optimizer(name: str) -> optax.GradientTransformation:
  """The optimiser `name` with its learning rate as traced state (one compiled program for every rate)."""
  return optax.inject_hyperparams(OPTIMIZERS[name])(learning_rate=DEFAULT_LEARNING_RATE)


def _init_at_rate(init: Callable, learning_rate: float, params) -> Any:
  state = init(params)
  return state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(learning_rate, jnp.float32)})


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
    base = _named_optimizer(optimizer)
    return optax.GradientTransformation(functools.partial(_init_at_rate, base.init, rate), base.update)
  if not isinstance(optimizer, optax.GradientTransformation):
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
      settings["optimizer"] = f"optax:{type(self.optimizer).__name__}"
    return settings


def loss_fn_for(dataset: Dataset) -> persample.LossFn:
  """Cross-entropy for classification datasets, squared error for regression."""
  return persample.squared_error if dataset.task == "regression" else persample.softmax_cross_entropy


def _per_unit_weight(output_grads, weights: jax.Array):
  """Per-sample output gradients of the weighted loss divided by each weight w_i (zero where w_i = 0)."""
  scale = safe_divide(1.0, weights)  # (B,)
  return jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), output_grads)


def _check_weights(weights: jax.Array, size: int, method: core.Method) -> None:
  if jnp.shape(weights) != (size,):
    raise ValueError(f"method {method.name} returned weights of shape {jnp.shape(weights)}; expected ({size},)")


def make_epoch(
    model: ModelLike,
    loss_fn: persample.LossFn,
    tx: optax.GradientTransformation,
    method: core.Method,
    val_batch_size: int,
    track_dynamics: bool = True,
):
  """Build `epoch(state, data, batch_indices) -> (state, metrics)`: one `lax.scan` over steps.

  `data` is `(train_x, train_y, val_x, val_y)`, optionally followed by the training samples' groups
  (N,) (`Split.groups`, shown to methods as `Batch.groups`); `batch_indices` (S, B) are the uniform
  epoch's batches (ignored when the method samples from its own `probs`); each step shows the method
  `val_batch_size` validation rows drawn without replacement. Metrics are stacked over steps.
  Jit the result once per run, donating the state. Traced under a data mesh (`jax.set_mesh`), each
  batch is split over its devices.
  """
  model = adapters.as_model(model)

  def step(data: tuple, state: LoopState, batch_indices: jax.Array):
    train_x, train_y, val_x, val_y, *groups = data
    key, batch_key, val_key, method_key = jax.random.split(state.key, 4)
    if method.probs is not None:
      batch_indices = sampling.weighted_batches(batch_key, method.probs(state.method_state), batch_indices.shape[0], 1)[0]
    # The batch axis is split over the ambient data mesh (a no-op on one device); batch-level sums and
    # softmaxes then run over the global batch, with the all-reduces inserted by jit's partitioner.
    batch = core.Batch(batch_indices, train_x[batch_indices], train_y[batch_indices], groups[0][batch_indices] if groups else None)
    batch = parallel.constrain_rows(batch, "batch_size")
    val_rows = core.validation_rows(val_key, val_x.shape[0], val_batch_size)

    plan = tape.make_plan(model, state.params, batch.x)

    def forward(params, perturbations):
      fwd = tape.forward(model, params, batch.x, perturbations=perturbations, plan=plan)
      return loss_fn(fwd.outputs, batch.y), fwd

    # One forward pass serves the method (losses, outputs, embeddings) and the weighted gradient; its zero
    # perturbations make the same backward pass yield every taped layer's output gradients.
    per_sample, pullback, fwd = jax.vjp(forward, state.params, tape.zero_perturbations(plan), has_aux=True)
    # Unit-weight output gradients: compiled away unless the method reads them.
    batch_tape = tape.assemble(fwd, pullback(jnp.ones_like(per_sample))[1], per_sample)
    ctx = core.StepContext(
        state.params, batch, val_x[val_rows], val_y[val_rows], method_key, per_sample, fwd.outputs,
        fwd.embeddings, train_x, train_y, batch_tape, (val_x, val_y), val_key,
    )
    weights, carry, weight_metrics = method.weights(state.method_state, ctx)
    _check_weights(weights, batch_indices.shape[0], method)

    def model_step(weights):
      grads, output_grads = pullback(weights)  # gradients of sum_i w_i l_i
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), (grads, updates, opt_state, output_grads)

    # The step's VJP costs nothing unless a method asks how the new params depend on the weights.
    params, step_vjp, (grads, updates, opt_state, output_grads) = jax.vjp(model_step, weights, has_aux=True)
    step_tape = tape.assemble(fwd, _per_unit_weight(output_grads, weights), per_sample)
    result = core.StepResult(per_sample, params, lambda cotangent: step_vjp(cotangent)[0], step_tape)
    method_state, update_metrics = method.update(state.method_state, ctx, result, carry)
    tracker = state.tracker
    if track_dynamics:
      classified = jnp.issubdtype(batch.y.dtype, jnp.integer)
      tracker = signals.tracker_update(
          tracker, batch.indices, per_sample, fwd.outputs if classified else None, batch.y if classified else None
      )
    metrics = {
        "loss": jnp.sum(weights * per_sample),
        "mean_loss": jnp.mean(per_sample),
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
        **core.weight_diagnostics(weights),
        **weight_metrics,
        **update_metrics,
    }
    return LoopState(params, opt_state, method_state, tracker, state.step + 1, key), metrics

  def epoch(state: LoopState, data: tuple, batch_indices: jax.Array):
    return jax.lax.scan(functools.partial(step, data), state, batch_indices)

  return epoch


def evaluate(model: ModelLike, loss_fn: persample.LossFn, params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Mean loss and (for integer targets) accuracy of `params` on all of (x, y)."""
  outputs = persample.outputs(model, params, x)
  result = {"loss": jnp.mean(loss_fn(outputs, y))}
  if jnp.issubdtype(y.dtype, jnp.integer):
    result["accuracy"] = jnp.mean(jnp.argmax(outputs, axis=-1) == y)
  return result


@functools.lru_cache(maxsize=8)
def _compiled_epoch(model: Model, loss_fn, update: Callable, method: core.Method, val_batch_size: int, track: bool, mesh):
  """The jitted epoch, shared by every run with the same model, optimiser update, method and mesh (all seeds and rates).

  On a mesh its outputs (state and metrics) are pinned replicated, the shardings its inputs have, so the
  next epoch reuses the program. Only the few most recent are kept: each holds compiled programs, and a
  process that keeps hundreds of them alive (a long test session) runs out of memory mappings.
  """
  tx = optax.GradientTransformation(_no_init, update)  # the epoch only updates; `fit` initialises the state
  epoch = make_epoch(model, loss_fn, tx, method, val_batch_size, track)
  return jax.jit(epoch, donate_argnums=0, **parallel.replicated_outputs(mesh))


def _no_init(params):
  raise AssertionError("the compiled epoch never initialises an optimiser")


@functools.lru_cache(maxsize=8)
def _compiled_evaluate(model: Model, loss_fn, mesh):
  return jax.jit(lambda p, x, y: evaluate(model, loss_fn, p, x, y), **parallel.replicated_outputs(mesh))


def progress_enabled() -> bool:
  """Show progress bars on a terminal, never in CI or when output is redirected."""
  return sys.stderr.isatty() and not os.environ.get("CI")


class FitResult(NamedTuple):
  """The final loop state and the per-epoch evaluation history."""

  state: LoopState
  history: list[dict[str, Any]]


def _initial_state(model: Model, dataset: Dataset, config: TrainConfig, method: core.Method, tx, params, keys):
  """The loop state before the first epoch: params (given, or the model's init), optimiser, method, tracker."""
  init_key, method_key, loop_key = keys
  if params is None:
    params = adapters.init(model, init_key, dataset.input_shape, dataset.train.x.dtype)
  else:
    adapters.check_params(model, params, dataset.input_shape, dataset.train.x.dtype)
  num_train = len(dataset.train)
  state = LoopState(
      params=params,
      opt_state=tx.init(params),
      method_state=method.init(method_key, num_train),
      tracker=signals.tracker_init(num_train) if config.track_dynamics else None,
      step=jnp.zeros((), jnp.int32),
      key=loop_key,
  )
  # The state is donated to each epoch; give every leaf its own buffer, since inits may share one.
  return jax.tree.map(jnp.copy, state)


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
    params: Any = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
  """Train `model` on `dataset` with `method` (uniform by default); returns the state and history.

  `model` is a Flax linen or NNX module or an `apply(params, x)` function; `params` are the starting
  parameters (default: the model's init with `config.seed`; an NNX module starts from its own, and a
  function needs them given). Each epoch is one compiled scan. After every epoch the validation and
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
  model = adapters.as_model(model)
  method = method or core.uniform()
  config.check(dataset)
  mesh = parallel.resolve_mesh(mesh)
  if mesh is not None:
    parallel.check_divides(config.batch_size, parallel.mesh_size(mesh), "batch_size")
  for split_name in ("train", "val", "test"):
    checks.check_finite_rows(f"{split_name} features", getattr(dataset, split_name).x)
  checks.check_int("log_every", log_every)
  loss_fn = loss_fn_for(dataset)
  tx = make_optimizer(config.optimizer, config.learning_rate)
  init_key, method_key, loop_key, order_key = jax.random.split(jax.random.key(config.seed), 4)
  state = _initial_state(model, dataset, config, method, tx, params, (init_key, method_key, loop_key))
  data = tuple(
      jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y, dataset.train.groups)
  )
  splits = {name: (jnp.asarray(getattr(dataset, name).x), jnp.asarray(getattr(dataset, name).y)) for name in ("val", "test")}
  state, data, splits = parallel.replicate((state, data, splits), mesh)
  # The epoch never calls `init`, so methods that differ only in their initial state share it.
  stepper = method._replace(init=None)
  epoch_fn = _compiled_epoch(model, loss_fn, tx.update, stepper, config.val_batch_size, config.track_dynamics, mesh)
  eval_fn = _compiled_evaluate(model, loss_fn, mesh)

  history = []
  settings = {k: v for k, v in config.describe().items() if k != "epochs"}  # all but epochs must match to continue
  checkpoints = None if checkpoint_dir is None else checkpointing.Checkpoints(checkpoint_dir, settings)
  if checkpoints is not None and (restored := checkpoints.restore(state)) is not None:
    state, history = restored
  bar = tqdm.trange(
      len(history), config.epochs, initial=len(history), total=config.epochs,
      desc=method.name, disable=not progress_enabled() or not parallel.is_main_process(), leave=False,
  )
  with parallel.use_mesh(mesh):
    for epoch in bar:
      batches = _epoch_indices(order_key, epoch, len(dataset.train), config)
      batches = parallel.replicate(batches, mesh)
      state, step_metrics = epoch_fn(state, data, batches)
      step_metrics = jax.device_get(step_metrics)
      record = _epoch_record(epoch, state, step_metrics, eval_fn, splits)
      if log is not None:
        first_step = int(state.step) - len(batches)
        for i in range(0, len(batches), log_every):
          log({"step": first_step + i + 1, **{f"step/{k}": float(v[i]) for k, v in step_metrics.items()}})
        log(record)
      history.append(record)
      bar.set_postfix(loss=f"{record['train/mean_loss']:.3f}")
      _check_finite_loss(step_metrics, state, epoch)
      if checkpoints is not None:
        checkpoints.save(epoch + 1, state, history)
  return FitResult(state, history)
