"""Per-sample data-quality signals, the MTS position features and a training-dynamics tracker.

Every function is pure, takes `jax.Array`s with the batch axis 0 and works under `jax.jit` and
`jax.vmap` (integer settings such as `k`, `num_classes` and `block_size` are static); nothing here is
jitted. Value checks run outside `jit` only; shape checks always. Cosines treat a zero vector as
orthogonal to everything, and use `precision="highest"` so that duplicates reach 1 on accelerators.

* `outputs`: signals of one forward pass (`predictive_entropy`, `margin`, `el2n`, `true_class_prob`,
  `embedding_norm`); per-sample losses and gradient norms live in `metasel.persample`.
* `neighbours`: blockwise `redundancy` and the MTS position features (Du, Zhao, Li, "On the Difficulty
  of Learning a Meta-network for Training Data Selection") against a clean reference set.
* `dynamics`: `TrackerState`, `tracker_init`, `tracker_update`, `tracker_summary` and
  `training_dynamics_features`, O(N) running moments rather than histories.
* `summaries`: `pool_summary`, run-level scalars (quantiles, shares, spreads) of a pool's signals, to log
  beside a learning curve.
"""

from metasel.signals.dynamics import (
    TrackerState,
    tracker_init,
    tracker_summary,
    tracker_update,
    training_dynamics_features,
)
from metasel.signals.neighbours import (
    cosine_to_class_centre,
    cosine_to_reference_centre,
    knn_label_agreement,
    loss_percentile_within_class,
    position_features,
    redundancy,
    topk_cosine_to_reference,
)
from metasel.signals.summaries import SUMMARY_NAMES as SUMMARY_NAMES, pool_summary  # the names of pool_summary
from metasel.signals.outputs import el2n, embedding_norm, margin, predictive_entropy, true_class_prob

__all__ = [
    "predictive_entropy",
    "margin",
    "el2n",
    "true_class_prob",
    "embedding_norm",
    "redundancy",
    "cosine_to_class_centre",
    "cosine_to_reference_centre",
    "topk_cosine_to_reference",
    "knn_label_agreement",
    "loss_percentile_within_class",
    "position_features",
    "TrackerState",
    "tracker_init",
    "tracker_update",
    "tracker_summary",
    "training_dynamics_features",
    "pool_summary",
]
