"""transformers config of a diffmoe model exported with custom code (``trust_remote_code=True``).

Self-contained: imports only transformers. ``diffmoe`` holds diffmoe's own model config dict
(``ModelConfig.to_dict()``); the usual transformers fields mirror it.
"""

from transformers import PretrainedConfig


class DiffMoEConfig(PretrainedConfig):
    model_type = "diffmoe"

    def __init__(
        self,
        diffmoe=None,
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        note=None,
        **kwargs,
    ):
        self.diffmoe = dict(diffmoe or {})
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.note = note
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
