"""Training controllers driven by per-sample signals: each a `core.Method` the training loop runs as it is.

The five interventions of "signals as controllers", in their closest published forms, with their
controls:

* static front-loading (`curriculum`) and its random-order control (`random_order_curriculum`);
* dynamic rescoring (`rescoring`, Loshchilov & Hutter's online batch selection) by the last loss;
* entropy rescoring (`entropy_rescoring`: predictive entropy, p(1 - p) or cartography variability);
* gradient weighting, by importance sampling on the gradient-norm bound (`importance_sampling`,
  Katharopoulos & Fleuret) or by direct loss weighting (`loss_weighting`, mild or aggressive);
* InfoBatch (`infobatch`), unbiased soft pruning, and the random-score negative control
  (`random_scores`).

Each reads its signal (`scores.SIGNALS`) off the step's own forward pass, so none runs the model again
(except `rescoring` with a pool refresh). Each docstring states whether it changes the objective.
"""

from metasel.controllers.curriculum import CurriculumState, available_probs, curriculum, random_order_curriculum
from metasel.controllers.infobatch import InfoBatchState, infobatch
from metasel.controllers.rescoring import RescoringState, entropy_rescoring, random_scores, rescoring
from metasel.controllers.scores import (
    BATCH_SIGNALS, DYNAMICS_SIGNALS, POOL_SIGNALS, SIGNALS, ScoreTable, annealed_pressure, output_grad_norm, pacing,
    pool_signal, rank_probs,
)
from metasel.controllers.weighting import (
    ImportanceState, importance_sampling, importance_weights, loss_weighting, variance_reduction,
)

__all__ = [
    "curriculum", "random_order_curriculum", "rescoring", "entropy_rescoring", "random_scores",
    "importance_sampling", "loss_weighting", "infobatch", "importance_weights", "variance_reduction",
    "pacing", "annealed_pressure", "rank_probs", "available_probs", "output_grad_norm", "SIGNALS",
    "BATCH_SIGNALS", "DYNAMICS_SIGNALS", "POOL_SIGNALS", "pool_signal", "ScoreTable", "CurriculumState", "RescoringState", "ImportanceState",
    "InfoBatchState",
]
