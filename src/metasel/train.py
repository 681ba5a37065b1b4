"""One training loop for every data-selection method.

A method is a small record of pure functions over its own state (`Method`), in the optax manner:
it gives each batch's per-sample weights and, optionally, the sampling distribution over the pool.
One epoch is one compiled program: a `lax.scan` over its steps, each step drawing its batch on
device, weighting the per-sample losses, taking an optax step and updating the method's state and a
per-sample signal tracker. The Python side only logs metrics, shows progress and stops on a NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from metasel import persample, signals
from metasel.data import Dataset, sampling
from metasel.models import init_params

__all__ = [
    "Batch",
    "StepContext",
    "StepResult",
    "Method",
    "uniform",
    "weight_diagnostics",
    "LoopState",
    "TrainConfig",
    "make_optimizer",
    "loss_fn_for",
    "make_epoch",
    "evaluate",
    "fit",
    "FitResult",
    "progress_enabled",
]


class Batch(NamedTuple):
  """A training batch: pool indices (B,), inputs (B, ...), targets (B,), real/synthetic groups (B,)."""

  indices: jax.Array
  x: jax.Array
  y: jax.Array
  groups: jax.Array | None = None


class StepContext(NamedTuple):
  """What a method may look at in one step: model params, the batch, a clean validation batch, a key.

  The loop also fills in its own forward pass on the batch at `params` (per-sample `losses` (B,),
  `outputs` (B, O) and `embeddings` (B, D)), so methods need not run the model again for them, and
  the whole training pool (`train_x` (N, ...), `train_y` (N,)) for methods that score or probe it.
  """

  params: Any
  batch: Batch
  val_x: jax.Array
  val_y: jax.Array
  key: jax.Array
  losses: jax.Array | None = None
  outputs: jax.Array | None = None
  embeddings: jax.Array | None = None
  train_x: jax.Array | None = None
  train_y: jax.Array | None = None


class StepResult(NamedTuple):
  """What a method learns from the model's step.

  Attributes:
    losses: per-sample losses (B,) before the step.
    params: the model's params after the step.
    weight_vjp: `cotangent on params -> (B,)`: how the new params depend on each sample's weight, e.g.
      with the gradient of a validation loss at `params` it gives d L_val(params) / d w_i exactly, for
      the loop's own optimiser and its state.
    tape: the step's `persample.GhostTape` at the params before the step, from its own forward and
      backward pass: every ghost layer's per-sample inputs and loss-to-output gradients (zero for a
      sample of weight zero), from which per-sample gradient norms and dot products follow.
  """

  losses: jax.Array
  params: Any
  weight_vjp: Callable[[Any], jax.Array]
  tape: persample.GhostTape | None = None


class Method(NamedTuple):
  """A data-selection method as pure functions over its state.

  Attributes:
    init: `(key, num_train) -> state`.
    weights: `(state, ctx) -> (weights, state, metrics)`: non-negative per-sample weights (B,) summing
      to one for the model's step, the state handed to `update` (it may carry what `update` needs from
      this step), and a dict of scalar metrics to log (the same keys every step; may be empty).
    update: `(state, ctx, step_result) -> (state, metrics)`, called after the model step with a
      `StepResult`; returns the state in the structure `init` gives, and metrics as above.
    probs: optional `state -> (N,)` sampling distribution over the training pool; when absent the
      loop walks the pool in uniformly shuffled epochs.
    name: label used in logs.
  """

  init: Callable[[jax.Array, int], Any]
  weights: Callable[[Any, StepContext], jax.Array]
  update: Callable[[Any, StepContext, jax.Array], Any]
  probs: Callable[[Any], jax.Array] | None = None
  name: str = "method"


def _uniform_weights(state, ctx):
  size = ctx.batch.y.shape[0]
  return jnp.full((size,), 1.0 / size, jnp.float32), state, {}


_UNIFORM = Method(
    init=lambda key, num_train: (),
    weights=_uniform_weights,
    update=lambda state, ctx, result: (state, {}),
    name="uniform",
)


def uniform() -> Method:
  """Every sample of a batch weighted 1/B, batches drawn as shuffled epochs: plain training.

  Always the same record, so that runs with it share their compiled epochs.
  """
  return _UNIFORM


def weight_diagnostics(weights: jax.Array) -> dict[str, jax.Array]:
  """Effective batch size 1/sum p_i^2, max p_i and Var(p_i) of normalised weights p (B,)."""
  return {
      "effective_batch_size": 1.0 / jnp.sum(jnp.square(weights)),
      "max_weight": jnp.max(weights),
      "weight_var": jnp.var(weights),
  }


class LoopState(NamedTuple):
  """Everything that changes during training, carried through the compiled epoch."""

  params: Any
  opt_state: Any
  method_state: Any
  tracker: signals.TrackerState
  step: jax.Array
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of one training run.

  Attributes:
    epochs: passes over the training pool (an epoch is `len(train) // batch_size` steps).
    batch_size: samples per step.
    val_batch_size: clean validation samples a method sees per step.
    optimizer: "sgd", "momentum" or "adam".
    learning_rate: the optimizer's step size.
    seed: seeds parameters, batch order and the method.
  """

  epochs: int = 10
  batch_size: int = 64
  val_batch_size: int = 64
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  seed: int = 0

  def check(self, dataset: Dataset) -> None:
    """Raise a clear ValueError for settings this dataset cannot support, before any compute."""
    for name in ("epochs", "batch_size", "val_batch_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.batch_size > len(dataset.train):
      raise ValueError(
          f"batch_size={self.batch_size} is larger than the training split ({len(dataset.train)} samples);"
          " expected at most the split size"
      )
    if self.val_batch_size > len(dataset.val):
      raise ValueError(
          f"val_batch_size={self.val_batch_size} is larger than the validation split"
          f" ({len(dataset.val)} samples); expected at most the split size"
      )
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
    make_optimizer(self.optimizer, self.learning_rate)


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """The optax optimizer called `name` ("sgd", "momentum" or "adam")."""
  makers = {
      "sgd": lambda lr: optax.sgd(lr),
      "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
      "adam": lambda lr: optax.adam(lr, eps_root=1e-16),  # eps_root: finite derivatives through the step
  }
  if name not in makers:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(makers)}")
  return makers[name](learning_rate)


def loss_fn_for(dataset: Dataset) -> persample.LossFn:
  """Cross-entropy for classification datasets, squared error for regression."""
  return persample.squared_error if dataset.task == "regression" else persample.softmax_cross_entropy


def _check_finite(dataset: Dataset) -> None:
  for split_name in ("train", "val", "test"):
    split = getattr(dataset, split_name)
    bad = ~np.isfinite(np.asarray(split.x, dtype=np.float64))
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise ValueError(
          f"{split_name} features contain NaN or inf ({int(bad.sum())} values, first in row {row});"
          " expected finite numbers"
      )


def _per_unit_weight(output_grads, weights: jax.Array):
  """Per-sample output gradients of the weighted loss divided by each weight w_i (zero where w_i = 0)."""
  positive = weights > 0
  scale = jnp.where(positive, 1.0 / jnp.where(positive, weights, 1.0), 0.0)  # (B,)
  return jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), output_grads)


def make_epoch(
    model: nn.Module,
    loss_fn: persample.LossFn,
    tx: optax.GradientTransformation,
    method: Method,
    val_batch_size: int,
):
  """Build `epoch(state, data, batch_indices) -> (state, metrics)`: one `lax.scan` over steps.

  `data` is `(train_x, train_y, val_x, val_y)`, optionally followed by the training samples' groups
  (N,) (`Split.groups`, shown to methods as `Batch.groups`); `batch_indices` (S, B) are the uniform epoch's
  batches (ignored when the method samples from its own `probs`); each step shows the method
  `val_batch_size` validation rows drawn without replacement. Metrics are stacked over steps.
  Jit the result once per run, donating the state.
  """

  def step(data: tuple, state: LoopState, batch_indices: jax.Array):
    train_x, train_y, val_x, val_y, *groups = data
    key, batch_key, val_key, method_key = jax.random.split(state.key, 4)
    if method.probs is not None:
      batch_indices = sampling.weighted_batches(
          batch_key, method.probs(state.method_state), batch_indices.shape[0], 1
      )[0]
    batch_groups = groups[0][batch_indices] if groups else None
    batch = Batch(batch_indices, train_x[batch_indices], train_y[batch_indices], batch_groups)
    val_rows = jax.random.choice(val_key, val_x.shape[0], (val_batch_size,), replace=False)
    def forward(params, perturbations):
      return persample.taped_forward(model, params, perturbations, batch.x, batch.y, loss_fn)

    # One forward pass serves the method (losses, outputs, embeddings) and the weighted gradient; its
    # zero perturbations make the same backward pass yield every ghost layer's output gradients.
    perturbations = persample.zero_perturbations(model, state.params, batch.x)
    per_sample, pullback, (outputs, embeddings, layer_inputs) = jax.vjp(
        forward, state.params, perturbations, has_aux=True
    )
    ctx = StepContext(
        state.params, batch, val_x[val_rows], val_y[val_rows], method_key, per_sample, outputs, embeddings,
        train_x, train_y,
    )
    weights, method_state, weight_metrics = method.weights(state.method_state, ctx)

    def model_step(weights):
      grads, output_grads = pullback(weights)  # gradients of sum_i w_i l_i
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), (grads, updates, opt_state, output_grads)

    # The step's VJP costs nothing unless a method asks how the new params depend on the weights.
    params, step_vjp, (grads, updates, opt_state, output_grads) = jax.vjp(model_step, weights, has_aux=True)
    tape = persample.tape_of(
        per_sample, outputs, embeddings, layer_inputs, _per_unit_weight(output_grads, weights), strict=False
    )
    loss = jnp.sum(weights * per_sample)
    logits, labels = (outputs, batch.y) if jnp.issubdtype(batch.y.dtype, jnp.integer) else (None, None)
    tracker = signals.tracker_update(state.tracker, batch.indices, per_sample, logits, labels)
    result = StepResult(per_sample, params, lambda cotangent: step_vjp(cotangent)[0], tape)
    method_state, update_metrics = method.update(method_state, ctx, result)
    metrics = {
        "loss": loss,
        "mean_loss": jnp.mean(per_sample),
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
        **weight_diagnostics(weights),
        **weight_metrics,
        **update_metrics,
    }
    return LoopState(params, opt_state, method_state, tracker, state.step + 1, key), metrics

  def epoch(state: LoopState, data: tuple, batch_indices: jax.Array):
    return jax.lax.scan(functools.partial(step, data), state, batch_indices)

  return epoch


def evaluate(model: nn.Module, loss_fn: persample.LossFn, params, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Mean loss and (for integer targets) accuracy of `params` on all of (x, y)."""
  outputs, _ = model.apply({"params": params}, x)
  result = {"loss": jnp.mean(loss_fn(outputs, y))}
  if jnp.issubdtype(y.dtype, jnp.integer):
    result["accuracy"] = jnp.mean(jnp.argmax(outputs, axis=-1) == y)
  return result


@functools.lru_cache(maxsize=8)
def _compiled_epoch(model, loss_fn, optimizer: str, learning_rate: float, method: Method, val_batch_size: int):
  """The jitted epoch, shared by every run with the same model, optimiser and method (e.g. all seeds).

  Only the few most recent are kept: each holds compiled programs, and a process that keeps hundreds
  of them alive (a long test session) runs out of memory mappings.
  """
  tx = make_optimizer(optimizer, learning_rate)
  return jax.jit(make_epoch(model, loss_fn, tx, method, val_batch_size), donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _compiled_evaluate(model, loss_fn):
  return jax.jit(lambda p, x, y: evaluate(model, loss_fn, p, x, y))


def progress_enabled() -> bool:
  """Show progress bars on a terminal, never in CI or when output is redirected."""
  return sys.stderr.isatty() and not os.environ.get("CI")


class FitResult(NamedTuple):
  """The final loop state and the per-epoch evaluation history."""

  state: LoopState
  history: list[dict[str, Any]]


class _Checkpoints:
  """Orbax checkpoints of the loop state and history after each epoch, for resuming a run."""

  def __init__(self, directory: str | os.PathLike, config: TrainConfig):
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
    # Everything but the epoch count must match for a checkpoint to continue this run.
    self.settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"}

  @staticmethod
  def _saveable(state: LoopState) -> LoopState:
    return state._replace(key=jax.random.key_data(state.key))

  def restore(self, state: LoopState) -> tuple[LoopState, list[dict[str, Any]]] | None:
    """The latest saved (state, history), or None when there is none yet."""
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._saveable(state))
    restored = self.manager.restore(
        epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    if restored.meta["settings"] != self.settings:
      raise ValueError(
          f"checkpoint in {self.manager.directory} was made with settings {restored.meta['settings']},"
          f" not {self.settings}; expected the same settings (only epochs may change) or a new folder"
      )
    state = restored.state._replace(key=jax.random.wrap_key_data(restored.state.key))
    return state, restored.meta["history"]

  def save(self, epoch: int, state: LoopState, history: list[dict[str, Any]]) -> None:
    meta = {"settings": self.settings, "history": history}
    self.manager.save(
        epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(self._saveable(state)), meta=ocp.args.JsonSave(meta))
    )
    self.manager.wait_until_finished()  # the next epoch donates these buffers


def fit(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    method: Method | None = None,
    *,
    log: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
) -> FitResult:
  """Train `model` on `dataset` with `method` (uniform by default); returns the state and history.

  Each epoch is one compiled scan. After every epoch the validation and test loss (and accuracy) are
  evaluated and passed to `log` together with the mean of the step metrics; per-step metrics are
  passed every `log_every` steps. A non-finite loss stops training with a FloatingPointError after
  everything up to that epoch has been logged.

  With `checkpoint_dir`, the state and history are saved there after every epoch, and a run that
  finds a checkpoint continues from it: it ends with the same numbers as an uninterrupted run.
  """
  method = method or uniform()
  config.check(dataset)
  _check_finite(dataset)
  if log_every < 1:
    raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
  loss_fn = loss_fn_for(dataset)
  tx = make_optimizer(config.optimizer, config.learning_rate)

  key = jax.random.key(config.seed)
  init_key, method_key, loop_key, order_key = jax.random.split(key, 4)
  params = init_params(model, init_key, dataset.input_shape)
  num_train = len(dataset.train)
  state = LoopState(
      params=params,
      opt_state=tx.init(params),
      method_state=method.init(method_key, num_train),
      tracker=signals.tracker_init(num_train),
      step=jnp.zeros((), jnp.int32),
      key=loop_key,
  )
  # The state is donated to each epoch; give every leaf its own buffer, since inits may share one.
  state = jax.tree.map(jnp.copy, state)
  data = tuple(
      jnp.asarray(a)
      for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y, dataset.train.groups)
  )
  epoch_fn = _compiled_epoch(model, loss_fn, config.optimizer, config.learning_rate, method, config.val_batch_size)
  eval_fn = _compiled_evaluate(model, loss_fn)
  splits = {name: (jnp.asarray(getattr(dataset, name).x), jnp.asarray(getattr(dataset, name).y)) for name in ("val", "test")}

  history = []
  checkpoints = None if checkpoint_dir is None else _Checkpoints(checkpoint_dir, config)
  if checkpoints is not None and (restored := checkpoints.restore(state)) is not None:
    state, history = restored
  bar = tqdm.trange(
      len(history), config.epochs, initial=len(history), total=config.epochs,
      desc=method.name, disable=not progress_enabled(), leave=False,
  )
  for epoch in bar:
    batches = sampling.epoch_batches(jax.random.fold_in(order_key, epoch), num_train, config.batch_size)
    state, step_metrics = epoch_fn(state, data, batches)
    step_metrics = jax.device_get(step_metrics)
    record = {"epoch": epoch + 1, "step": int(state.step)}
    record.update({f"train/{k}": float(np.mean(v)) for k, v in step_metrics.items()})
    for name, (x, y) in splits.items():
      record.update({f"{name}/{k}": float(v) for k, v in eval_fn(state.params, x, y).items()})
    if log is not None:
      first_step = int(state.step) - len(batches)
      for i in range(0, len(batches), log_every):
        log({"step": first_step + i + 1, **{f"step/{k}": float(v[i]) for k, v in step_metrics.items()}})
      log(record)
    history.append(record)
    bar.set_postfix(loss=f"{record['train/mean_loss']:.3f}")
    if not np.all(np.isfinite(step_metrics["loss"])):
      bad = int(np.argmin(np.isfinite(step_metrics["loss"])))
      raise FloatingPointError(
          f"training loss became non-finite at step {int(state.step) - len(batches) + bad + 1}"
          f" (epoch {epoch + 1}); metrics up to this epoch were logged. Lower the learning rate or check the data."
      )
    if checkpoints is not None:
      checkpoints.save(epoch + 1, state, history)
  return FitResult(state, history)

