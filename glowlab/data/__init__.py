"""Data preparation and reading, with no model code and no training framework."""

from glowlab.data.prepare import PrepareOptions, prepare
from glowlab.data.shards import Augment, DataError, ShardStream, read_manifest, shard_urls
from glowlab.data.sources import SOURCES, ImageSource, load_source
from glowlab.data.tabular import load_vectors, split_vectors, standardise
from glowlab.data.toy import TOY_DATASETS, make_toy, toy_splits

__all__ = [
    "SOURCES",
    "TOY_DATASETS",
    "Augment",
    "DataError",
    "ImageSource",
    "PrepareOptions",
    "ShardStream",
    "load_source",
    "load_vectors",
    "make_toy",
    "prepare",
    "read_manifest",
    "shard_urls",
    "split_vectors",
    "standardise",
    "toy_splits",
]
