"""The decoder language model."""

from .cache import KVCache
from .decoder import Attention, Block, Decoder, RMSNorm, Rotary

__all__ = ["Decoder", "KVCache", "RMSNorm", "Rotary", "Attention", "Block"]
