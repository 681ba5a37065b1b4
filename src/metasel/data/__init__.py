"""Datasets as numpy train/val/test splits with metadata, and JAX index streams for training.

`load(spec, seed=..., **options)` gives a `Dataset` for "sine", "mixture", "digits-synthetic",
"csv:PATH", "tsv:PATH", "lines:PATH" or "tfds:NAME", and "corrupted:SPEC" makes a real+synthetic mixture
with known corruption tiers out of any of those classification sets; `from_arrays` wraps your own arrays.
Text sources give TF-IDF features, or int32 token ids with `representation="tokens"` (then
`Dataset.vocabulary` holds the token of each id and `text.token_mask` marks the non-padding positions).
"""

from metasel.data import arrays, readers, sampling, sources, synthetic, text
from metasel.data.dataset import CLEAN_TIER, REAL_GROUP, SYNTHETIC_GROUP, Dataset, Split
from metasel.data.sampling import epoch_batches, pass_batches, weighted_batches
from metasel.data.arrays import from_arrays, stratified_subsets
from metasel.data.sources import load

__all__ = [
    "CLEAN_TIER",
    "Dataset",
    "REAL_GROUP",
    "SYNTHETIC_GROUP",
    "Split",
    "epoch_batches",
    "pass_batches",
    "arrays",
    "from_arrays",
    "load",
    "readers",
    "sampling",
    "sources",
    "stratified_subsets",
    "synthetic",
    "text",
    "weighted_batches",
]
