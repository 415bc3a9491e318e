"""diffmoe: pre-training Mixture-of-Experts language models with differentiable (Lory) and
gradient-informed (GRIN / SparseMixer-v2) routing, and the dense, top-k and expert-choice baselines."""

from .config import ConfigError, ModelConfig, MoEConfig
from .model import Decoder, KVCache

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "Decoder", "KVCache", "__version__"]
