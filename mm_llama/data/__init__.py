"""Data: built-in shard generators, the WebDataset pipeline, example encoding, collation.

Nothing here imports ``lightning``; the data module on top lives with the training code.
"""

from mm_llama.data.collate import collate, pad_text
from mm_llama.data.examples import (
    CAPTION_PROMPT,
    DEFAULT_MEDIA_PLACEHOLDER,
    IGNORE_INDEX,
    BadExample,
    ChatTokenizer,
    ExampleTooLong,
    encode_example,
    encode_prompt,
)
from mm_llama.data.pipeline import (
    SKIP_KINDS,
    DataConfig,
    ResizeToTensor,
    ShardDataset,
    SkipCounter,
    build_dataset,
    build_loader,
    resolve_urls,
    samples_per_worker,
    train_batches_per_rank,
)
from mm_llama.data.scenes import make_default_shards, write_shards

__all__ = [
    "CAPTION_PROMPT",
    "DEFAULT_MEDIA_PLACEHOLDER",
    "IGNORE_INDEX",
    "SKIP_KINDS",
    "BadExample",
    "ChatTokenizer",
    "DataConfig",
    "ExampleTooLong",
    "ResizeToTensor",
    "ShardDataset",
    "SkipCounter",
    "build_dataset",
    "build_loader",
    "collate",
    "encode_example",
    "encode_prompt",
    "make_default_shards",
    "pad_text",
    "resolve_urls",
    "samples_per_worker",
    "train_batches_per_rank",
    "write_shards",
]
