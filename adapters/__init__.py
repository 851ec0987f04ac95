"""Trainable adapters that join media encoders to the frozen LM.

Note: this top-level package shares its name with the AdapterHub library
(``pip install adapters``); the two cannot be installed in one environment.
:mod:`mm_llama.model` checks ``__mm_llama__`` and says so if the wrong one is found.
"""

__mm_llama__ = True

from adapters.cross_attention import GatedCrossAttention, default_layer_positions  # noqa: E402
from adapters.fusion_embedding import FusionEmbedding  # noqa: E402
from adapters.projection import MediaProjection  # noqa: E402

__all__ = ["FusionEmbedding", "GatedCrossAttention", "MediaProjection", "default_layer_positions"]
