"""Datasets as numpy train/val/test splits with metadata, and JAX index streams for training.

`load(spec, seed=..., **options)` gives a `Dataset` for "sine", "mixture", "digits-synthetic",
"csv:PATH", "tsv:PATH", "lines:PATH" or "tfds:NAME"; `from_arrays` wraps your own arrays.
"""

from metasel.data import sampling, sources, synthetic, text
from metasel.data.dataset import CLEAN_TIER, Dataset, Split
from metasel.data.sampling import epoch_batches, weighted_batches
from metasel.data.sources import from_arrays, load

__all__ = [
    "CLEAN_TIER",
    "Dataset",
    "Split",
    "epoch_batches",
    "from_arrays",
    "load",
    "sampling",
    "sources",
    "synthetic",
    "text",
    "weighted_batches",
]
