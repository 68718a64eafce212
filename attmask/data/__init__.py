"""Datasets as WebDataset shards: sources, shard writer/manifest, transforms and streams."""
