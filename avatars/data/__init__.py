"""Training data: batches from the WebDataset shards written by `shards.writer`."""

from .shard_dataset import LoaderConfig, ResumableSampler, ShardDataset, ShardError, ShardLoader, collate, make_loader

__all__ = ["LoaderConfig", "ResumableSampler", "ShardDataset", "ShardError", "ShardLoader", "collate", "make_loader"]
