"""Byte-level (or pre-tokenised) corpora and deterministic, disjoint per-worker sampling.

`load_corpus` reads the tokens, `split_eval` holds out the tail for evaluation, `ShardSampler`
gives each worker batches from its own shard as a pure function of the step, and `eval_batches`
builds the fixed eval set that every worker shares.
"""

from lowband.data.corpus import Corpus, load_corpus, split_eval
from lowband.data.partition import PartitionSampler, PartitionSpec, make_sampler
from lowband.data.sampler import ShardSampler, eval_batches

__all__ = [
    "Corpus",
    "PartitionSampler",
    "PartitionSpec",
    "ShardSampler",
    "eval_batches",
    "load_corpus",
    "make_sampler",
    "split_eval",
]
