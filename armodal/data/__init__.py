"""Data: raw document sources -> cached token shards -> TokenDataModule."""

from armodal.data.datamodule import TokenDataModule, WindowDataset
from armodal.data.shards import TokenShards, build_or_load_shards
from armodal.data.sources import DocumentSource, StdlibSource, TextSource

__all__ = [
    "DocumentSource",
    "StdlibSource",
    "TextSource",
    "TokenDataModule",
    "TokenShards",
    "WindowDataset",
    "build_or_load_shards",
]
