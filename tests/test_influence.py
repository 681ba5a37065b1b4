"""Online influence against explicit per-sample gradients and independent numpy formulas; GREATS against a hand loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zoo import BATCH, LOSS, NAMES, ZOO, close, naive

from metasel import ghost, influence, persample
from metasel.ghost import DENSE, EMBED, NORM, LayerInfo, LayerTape

pytestmark = pytest.mark.filterwarnings("ignore:.*take the slow vmap path")

VAL_ROWS = np.array([4, 1, 3, 0])  # the validation batch: four of the zoo batch's samples, in another order


def _columns(params, leaves) -> np.ndarray:
  """Columns of the flat per-sample gradient (`zoo.flat` order) that belong to the parameter leaves numbered `leaves`."""
  starts = np.cumsum([0] + [int(np.size(leaf)) for leaf in jax.tree.leaves(params)])
  return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in leaves] + [np.zeros(0, int)])


# ----------------------------------------------------------------------------------------------------
# Ghost influence


@functools.cache
def _ghost(name: str) -> dict[str, np.ndarray]:
  """A zoo case's ghost influence and interactions by the scorer (the interactions from the batch's tape, as in
  the training loop) and directly on `persample.record` tapes, from one jitted call."""
  case = ZOO[name]
  scorer = influence.ghost_scorer(case.model, LOSS)

  def run(params, x, y, val_x, val_y):
    train_tape = persample.record(case.model, params, x, y, LOSS)
    val_tape = persample.record(case.model, params, val_x, val_y, LOSS)
    return {
        "scores": scorer.scores(params, x, y, val_x, val_y),
        "interactions": scorer.interactions(params, x, y, tape=train_tape),
        "direct": influence.ghost_influence(train_tape, val_tape, params),
        "direct_pairwise": influence.ghost_pairwise(train_tape, val_tape),
    }

  return jax.device_get(jax.jit(run)(case.params, case.x, case.y, case.x[VAL_ROWS], case.y[VAL_ROWS]))


@pytest.mark.parametrize("name", NAMES)
def test_ghost_scorer_equals_explicit_per_sample_gradients(name):
  """<grad l_i, grad L_V> and <grad l_i, grad l_j>, untaped leaves (CNN groups, raw params, a function) by vmap."""
  _, grads = naive(name)
  result = _ghost(name)
  expected = grads @ np.mean(grads[VAL_ROWS], axis=0)
  close(result["scores"], expected)
  close(result["interactions"], grads @ grads.T)


@pytest.mark.parametrize("name", NAMES)
def test_ghost_influence_on_tapes_covers_exactly_the_taped_layers(name):
  case = ZOO[name]
  _, grads = naive(name)
  names = persample.leaf_names(case.params)
  taped = grads[:, _columns(case.params, [i for i, leaf in enumerate(names) if leaf in case.ghost])]
  result = _ghost(name)
  assert result["direct"].shape == (BATCH,) and result["direct_pairwise"].shape == (BATCH, len(VAL_ROWS))
  close(result["direct"], taped @ np.mean(taped[VAL_ROWS], axis=0))
  close(result["direct_pairwise"], taped @ taped[VAL_ROWS].T)


def _formed(kind: str, rows: np.ndarray, grads: np.ndarray, roles: tuple[str, ...], vocab: int) -> dict[str, np.ndarray]:
  """Each sample's gradient of each parameter, formed by hand in float64 from the layer's rows and output gradients."""
  rows, grads = np.asarray(rows), np.asarray(grads, np.float64)
  out = {}
  if kind == DENSE:
    out["kernel"] = np.einsum("bti,bto->bio", rows.astype(np.float64), grads)
  elif kind == NORM:
    out["scale"] = np.sum(rows.astype(np.float64) * grads, axis=1)
  else:
    table = np.zeros((rows.shape[0], vocab, grads.shape[-1]))
    for b in range(rows.shape[0]):
      for t in range(rows.shape[1]):
        table[b, rows[b, t]] += grads[b, t]
    out["embedding"] = table
  if "bias" in roles:
    out["bias"] = np.sum(grads, axis=1)
  return {role: out[role] for role in roles}


def _layer_pairs():
  """(training tape, validation tape, parameter shapes) of one layer of each kind and branch."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  b, c = 3, 4

  def pair(kind, roles, shapes, rows, val_rows, out):
    info = LayerInfo("layer", kind, kind, tuple((role, i) for i, role in enumerate(roles)))
    grads, val_grads = normal(rows.shape[0], rows.shape[1], out), normal(val_rows.shape[0], val_rows.shape[1], out)
    return LayerTape(info, rows, grads), LayerTape(info, val_rows, val_grads), shapes

  dense = ("kernel", "bias")
  ids = jnp.array([[1, 1, 3, 5, 1], [2, 2, 2, 0, 6], [3, 4, 5, 6, 0]])  # repeated ids within samples and across
  val_ids = jnp.array([[1, 3, 3, 0, 0], [6, 6, 2, 1, 1], [4, 4, 4, 4, 4], [0, 1, 2, 3, 5]])
  return {
      # T = 1 on both sides: the product of the two Gram scalars.
      "dense-single": pair(DENSE, dense, {"kernel": (5, 7), "bias": (7,)}, normal(b, 1, 5), normal(c, 1, 5), 7),
      # Gram branch: b c T S (in + out) = 768 <= (b T + c S + b c) in out = 1664.
      "dense-gram": pair(DENSE, dense, {"kernel": (8, 8), "bias": (8,)}, normal(b, 2, 8), normal(c, 2, 8), 8),
      # Formed branch: 2160 > 324.
      "dense-formed": pair(DENSE, dense, {"kernel": (2, 3), "bias": (3,)}, normal(b, 6, 2), normal(c, 6, 2), 3),
      "dense-no-bias": pair(DENSE, ("kernel",), {"kernel": (4, 3)}, normal(b, 3, 4), normal(c, 3, 4), 3),
      "dense-single-vs-many": pair(DENSE, dense, {"kernel": (4, 6), "bias": (6,)}, normal(b, 1, 4), normal(c, 3, 4), 6),
      "embed-repeated-ids": pair(EMBED, ("embedding",), {"embedding": (7, 4)}, ids, val_ids, 4),
      "layer-norm": pair(NORM, ("scale", "bias"), {"scale": (6,), "bias": (6,)}, normal(b, 2, 6), normal(c, 2, 6), 6),
      "rms-norm": pair(NORM, ("scale",), {"scale": (6,)}, normal(b, 1, 6), normal(c, 1, 6), 6),
  }


LAYER_PAIRS = _layer_pairs()


@pytest.mark.parametrize("case", sorted(LAYER_PAIRS))
def test_cross_dots_and_summed_grads_equal_formed_layer_gradients(case):
  layer, other, shapes = LAYER_PAIRS[case]
  roles = tuple(role for role, _ in layer.info.roles)
  vocab = shapes.get("embedding", (0,))[0]
  mine = _formed(layer.info.kind, layer.rows, layer.grads, roles, vocab)
  theirs = _formed(other.info.kind, other.rows, other.grads, roles, vocab)
  # `layer_grads` forms the same per-sample gradients; the ghost products must equal their dot products.
  for tape_, by_hand in ((layer, mine), (other, theirs)):
    formed = ghost.layer_grads(tape_, shapes)
    assert set(formed) == set(roles)
    for role in roles:
      close(formed[role], by_hand[role].reshape(formed[role].shape))
  expected = sum(mine[r].reshape(len(mine[r]), -1) @ theirs[r].reshape(len(theirs[r]), -1).T for r in roles)
  close(jax.jit(ghost.cross_dots)(layer, other), expected)
  summed = ghost.summed_grads(other, shapes)
  for role in roles:
    assert summed[role].shape == shapes[role]
    close(summed[role], np.sum(theirs[role], axis=0).reshape(shapes[role]))


def test_cross_dots_refuses_tapes_of_two_layers():
  layer, other, _ = LAYER_PAIRS["dense-single"]
  renamed = LayerTape(LayerInfo("other", DENSE, "Dense", layer.info.roles), other.rows, other.grads)
  with pytest.raises(ValueError, match="two tapes of one layer, got layer and other"):
    ghost.cross_dots(layer, renamed)


# ----------------------------------------------------------------------------------------------------
# Layer-aware influence, against numpy


def _np_pooled(rows: np.ndarray, has_bias: bool) -> np.ndarray:
  """a~: rows summed over positions, with the position count appended for a layer with a bias."""
  summed = np.sum(np.asarray(rows, np.float64), axis=1)
  return np.concatenate([summed, np.full((len(summed), 1), rows.shape[1])], axis=1) if has_bias else summed


def _np_pairwise(layers, g, val_layers, val_g) -> np.ndarray:
  """<g_i, g_j> sum_l <a~_i, a~_j> (B, m); `layers` are (rows (B, T, in), has_bias) per layer."""
  similarity = sum(_np_pooled(a, bias) @ _np_pooled(v, bias).T for (a, bias), (v, _) in zip(layers, val_layers))
  return (g @ val_g.T) * similarity


def _np_lai(layers, g, val_layers, val_g, form: str = "pairwise") -> np.ndarray:
  if form == "means":
    similarity = sum(_np_pooled(a, bias) @ _np_pooled(v, bias).mean(0) for (a, bias), (v, _) in zip(layers, val_layers))
    return (g @ val_g.mean(0)) * similarity
  return _np_pairwise(layers, g, val_layers, val_g).mean(1)


def _np_logit_grads(logits, y) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  return p / p.sum(1, keepdims=True) - np.eye(logits.shape[1])[np.asarray(y)]


def _mlp_by_hand(params, x):
  """The zoo MLP's dense layers' inputs {name: (rows (B, 1, in), has_bias)} in call order, and its logits."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h0 = np.asarray(x, np.float64)
  h1 = np.maximum(h0 @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  h2 = np.maximum(h1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
  layers = {"Dense_0": (h0[:, None], True), "Dense_1": (h1[:, None], True), "Dense_2": (h2[:, None], True)}
  return layers, h2 @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]


def _has_bias(params, name: str) -> bool:
  node = params
  for part in name.split("/"):
    node = node[part]
  return "bias" in node


LAI_MODELS = {
    "linen-mlp": ("Dense_0", "Dense_2"),
    "transformer": ("MultiHeadDotProductAttention_0/value", "Dense_1"),
}
LAI_VARIANTS = {  # name -> (layers, form, reference)
    "all": ("all", "pairwise", "validation"),
    "last": ("last", "pairwise", "validation"),
    "named": (None, "pairwise", "validation"),  # the model's names in LAI_MODELS
    "outer": ("all", "outer", "validation"),
    "last-outer": ("last", "outer", "validation"),
    "named-outer": (None, "outer", "validation"),
    "means": ("all", "means", "validation"),
    "named-means": (None, "means", "validation"),
    "self": ("all", "pairwise", "batch"),
    "self-means": ("all", "means", "batch"),
}
SCORED = ("all", "last", "named-outer", "self", "self-means")  # variants also run through `lai_scorer`


def _val_batch(name: str):
  case = ZOO[name]
  return case.x[::-1][:4], jnp.roll(case.y, 1)[:4]


@functools.cache
def _lai(name: str):
  """A zoo case's LAI variants by the tape functions and by `lai_scorer`, its interactions, the last layer's ghost
  term and the tapes, from one jitted call. The tape functions run on `persample.record` tapes, the scorers on
  their own forward passes (or on the training batch's tape, as in the training loop)."""
  case, named = ZOO[name], LAI_MODELS[name]
  layer_set = lambda layers: named if layers is None else layers  # noqa: E731
  scorers = {
      key: influence.lai_scorer(case.model, LOSS, layers=layer_set(layers), form=form, reference=reference)
      for key, (layers, form, reference) in LAI_VARIANTS.items()
  }

  def run(params, x, y, val_x, val_y):
    train_tape = persample.record(case.model, params, x, y, LOSS)
    val_tape = persample.record(case.model, params, val_x, val_y, LOSS)
    acts, val_acts = influence.activations(train_tape), influence.activations(val_tape)
    g, val_g = influence.logit_grads(LOSS, train_tape.outputs, y), influence.logit_grads(LOSS, val_tape.outputs, val_y)
    one = tuple((info, rows[:1]) for info, rows in val_acts)  # the first validation sample alone
    out = {}
    for key, (layers, form, reference) in LAI_VARIANTS.items():
      mine = influence.select_layers(acts, layer_set(layers))
      theirs = mine if reference == "batch" else influence.select_layers(val_acts, layer_set(layers))
      out[key] = influence.lai(mine, g, theirs, g if reference == "batch" else val_g, form=form)
    for form in influence.LAI_FORMS:
      out[f"{form}-one"] = influence.lai(acts, g, one, val_g[:1], form=form)
    out["all-against-batch"] = influence.lai(acts, g, acts, g)
    for key in SCORED:
      out[f"scorer-{key}"] = scorers[key].scores(params, x, y, val_x, val_y, tape=None if key == "all" else train_tape)
    out["interactions"] = scorers["all"].interactions(params, x, y)
    heads = [next(layer for layer in t.layers if layer.info.name == "Dense_2") for t in (train_tape, val_tape)]
    out["head-ghost"] = jnp.mean(ghost.cross_dots(*heads), axis=1)
    out["tapes"] = (train_tape, val_tape)
    return out

  val_x, val_y = _val_batch(name)
  return jax.device_get(jax.jit(run)(case.params, case.x, case.y, val_x, val_y))


def _np_inputs(name: str, result):
  """Independent numpy inputs of the LAI formula: {layer: (rows, has_bias)} of both batches and their logit gradients."""
  case = ZOO[name]
  val_x, val_y = _val_batch(name)
  if name == "linen-mlp":
    (layers, logits), (val_layers, val_logits) = _mlp_by_hand(case.params, case.x), _mlp_by_hand(case.params, val_x)
  else:  # rows from the tapes, whose per-sample gradients test_persample checks; biases read from the params
    train_tape, val_tape = result["tapes"]
    taped = lambda t: {lt.info.name: (lt.rows, _has_bias(case.params, lt.info.name)) for lt in t.layers if lt.info.kind == DENSE}  # noqa: E731
    layers, val_layers = taped(train_tape), taped(val_tape)
    logits, val_logits = train_tape.outputs, val_tape.outputs
  return layers, _np_logit_grads(logits, case.y), val_layers, _np_logit_grads(val_logits, val_y)


@pytest.mark.parametrize("name", sorted(LAI_MODELS))
def test_lai_equals_its_numpy_formula_for_every_layer_set_and_form(name):
  result = _lai(name)
  layers, g, val_layers, val_g = _np_inputs(name, result)
  names = list(layers)
  assert influence.dense_layer_names(result["tapes"][0]) == tuple(names) and names[-1] == "Dense_2"  # the head is last
  chosen = {"all": names, "last": names[-1:], None: list(LAI_MODELS[name])}
  for key, (which, form, reference) in LAI_VARIANTS.items():
    mine = [layers[n] for n in chosen[which]]
    theirs = mine if reference == "batch" else [val_layers[n] for n in chosen[which]]
    expected = _np_lai(mine, g, theirs, g if reference == "batch" else val_g, form)
    close(result[key], expected)
    if key in SCORED:
      close(result[f"scorer-{key}"], expected)
  close(result["interactions"], _np_pairwise(list(layers.values()), g, list(layers.values()), g))


@pytest.mark.parametrize("name", sorted(LAI_MODELS))
def test_lai_forms_and_references_agree_where_they_should(name):
  result = _lai(name)
  close(result["outer"], result["all"])
  close(result["last-outer"], result["last"])
  close(result["outer-one"], result["pairwise-one"])
  close(result["means-one"], result["pairwise-one"])  # with |V| = 1 the means are the sample
  close(result["self"], result["all-against-batch"])
  assert not np.allclose(result["means"], result["all"], rtol=1e-3)  # but not with |V| = 4


@pytest.mark.parametrize("name", sorted(LAI_MODELS))
def test_lai_over_the_last_layer_is_its_exact_ghost_term(name):
  result = _lai(name)
  close(result["last"], result["head-ghost"])
  close(result["scorer-last"], result["head-ghost"])


def test_lai_refuses_bad_layer_sets_forms_and_references():
  case = ZOO["linen-mlp"]
  val_x, val_y = _val_batch("linen-mlp")
  wrong = influence.lai_scorer(case.model, LOSS, layers=("Dense_0", "Dense_9"))
  with pytest.raises(ValueError, match=r"\['Dense_9'\].*names of its taped dense layers: \['Dense_0', 'Dense_1', 'Dense_2'\]"):
    jax.jit(wrong.scores)(case.params, case.x, case.y, val_x, val_y)
  with pytest.raises(ValueError, match=r"\['Dense_9'\].*\['Dense_0', 'Dense_1', 'Dense_2'\]"):
    jax.jit(influence.lai_scorer(case.model, LOSS, layers="Dense_9").interactions)(case.params, case.x, case.y)
  with pytest.raises(ValueError, match=r"LAI form must be one of \('pairwise', 'outer', 'means'\), got 'mean'"):
    influence.lai_scorer(case.model, LOSS, form="mean")
  with pytest.raises(ValueError, match="reference must be 'validation' or 'batch', got 'train'"):
    influence.lai_scorer(case.model, LOSS, reference="train")

  def lai(form, layers):  # the tape function on the batch, against the batch's first `layers` layers
    def run(params, x, y):
      acts = influence.activations(persample.record(case.model, params, x, y, LOSS))
      g = influence.logit_grads(LOSS, x[:, :3], y)
      return influence.lai(acts, g, acts[:layers], g, form=form)

    return jax.jit(run)(case.params, case.x, case.y)

  with pytest.raises(ValueError, match="LAI form must be one of"):
    lai("outer-product", 3)
  with pytest.raises(ValueError, match="the two batches' layer sets differ"):
    lai("outer", 1)
  function = ZOO["function"]
  with pytest.raises(ValueError, match="the model has no taped dense layer"):
    jax.jit(influence.lai_scorer(function.model, LOSS).scores)(function.params, function.x, function.y, val_x, val_y)


# ----------------------------------------------------------------------------------------------------
# GREATS


def _greedy_sets(scores: np.ndarray, interactions: np.ndarray, k: int, eta: float) -> set[frozenset[int]]:
  """Every set the greedy loop can end with, taking each branch where the best remaining scores tie."""
  found = set()

  def extend(s, picked):
    if len(picked) == k:
      found.add(picked)
      return
    free = [i for i in range(len(s)) if i not in picked]
    best = max(s[i] for i in free)
    for i in free:
      if s[i] == best:
        extend(s - eta * eta * interactions[i], picked | {i})

  extend(eta * scores, frozenset())
  return found


def _greats_cases():
  rng = np.random.default_rng(0)
  cases = []
  for trial in range(8):
    size = int(rng.integers(3, 9))
    if trial % 2:  # small integers and eta = 1/2: exact arithmetic, many ties, any tie-break is a greedy pick
      scores = rng.integers(-3, 4, size).astype(np.float32)
      half = rng.integers(-2, 3, (size, size))
      interactions, eta = (half + half.T).astype(np.float32), 0.5
    else:  # a Gram matrix of random gradients, as in training
      grads = rng.normal(size=(size, 4))
      scores = (grads @ rng.normal(size=4)).astype(np.float32)
      interactions, eta = (grads @ grads.T).astype(np.float32), float(rng.uniform(0.1, 2.0))
    cases.append((scores, interactions, int(rng.integers(1, size + 1)), eta))
  return cases


GREATS_CASES = _greats_cases()


@pytest.mark.parametrize("scores,interactions,k,eta", GREATS_CASES, ids=[f"case{i}" for i in range(len(GREATS_CASES))])
def test_greats_is_the_greedy_loop_and_picks_exactly_k(scores, interactions, k, eta):
  picked = np.asarray(jax.jit(influence.greats, static_argnums=2)(jnp.asarray(scores), jnp.asarray(interactions), k, eta))
  assert picked.dtype == bool and picked.shape == scores.shape and picked.sum() == k
  assert frozenset(np.flatnonzero(picked).tolist()) in _greedy_sets(scores, interactions, k, eta)


def test_greats_without_interactions_is_top_k_and_refuses_bad_k():
  scores = jnp.array([0.3, -1.0, 2.0, 0.5, 1.5])
  picked = influence.greats(scores, jnp.zeros((5, 5)), 3, 0.1)
  np.testing.assert_array_equal(picked, [False, False, True, True, True])
  for k in (0, 6, 2.0):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
      influence.greats(scores, jnp.zeros((5, 5)), k, 0.1)
  with pytest.raises(ValueError, match=r"interactions must have shape \(5, 5\), got \(5, 4\)"):
    influence.greats(scores, jnp.zeros((5, 4)), 2, 0.1)
