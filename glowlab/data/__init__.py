"""Data preparation and reading, with no model code and no training framework."""

from glowlab.data.prepare import PrepareOptions, prepare
from glowlab.data.shards import Augment, DataError, ShardStream, read_manifest, shard_urls
from glowlab.data.sources import SOURCES, ImageSource, load_source

__all__ = [
    "SOURCES",
    "Augment",
    "DataError",
    "ImageSource",
    "PrepareOptions",
    "ShardStream",
    "load_source",
    "prepare",
    "read_manifest",
    "shard_urls",
]
