"""Training helpers: captions in, embeddings precomputed once by the service, read back every epoch.

    precompute(RemoteTextEncoder("gpu-box:50051"), "captions.jsonl", "embeds/")   # once
    store = EmbeddingStore("embeds/")                                              # every epoch
    loader = DataLoader(EmbeddingDataset(store), batch_size=4)

See docs/training.md.
"""

from dit_client.training.captions import CaptionSourceError, iter_caption_records, iter_captions
from dit_client.training.dataset import EmbeddingDataset, text_ids_for
from dit_client.training.precompute import PrecomputeReport, precompute
from dit_client.training.remote_fn import remote_text_encoder
from dit_client.training.store import EmbeddingStore, StoreError, StoreInfo, StoreWriter

__all__ = [
    "CaptionSourceError",
    "EmbeddingDataset",
    "EmbeddingStore",
    "PrecomputeReport",
    "StoreError",
    "StoreInfo",
    "StoreWriter",
    "iter_caption_records",
    "iter_captions",
    "precompute",
    "remote_text_encoder",
    "text_ids_for",
]
