"""BertConfig (the model's sizes and dropouts) and the size presets: imported by the model and by the
transformers conversion (bertfast.model.hf) alike."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRESETS = {  # name: (num_hidden_layers, hidden_size); heads = hidden / 64, intermediate = 4 * hidden
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_len: int = 512  # number of position embeddings: the longest sequence the model takes
    type_vocab_size: int = 2
    dropout: float = 0.1  # hidden dropout (embeddings, after each sub-layer)
    attention_dropout: float = 0.1  # dropout on the attention probabilities
    layer_norm_eps: float = 1e-12
    pad_token_idx: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_len", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig.{name}={value!r}: must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: choose heads that divide the hidden size (BERT uses hidden / 64)")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name}={value!r}: must be in [0, 1)")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"BertConfig.layer_norm_eps={self.layer_norm_eps!r}: must be > 0")
        if not 0 <= self.pad_token_idx < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_idx={self.pad_token_idx} must be in [0, vocab_size="
                             f"{self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """tiny 2x128, mini 4x256, small 4x512, medium 8x512, base 12x768, large 24x1024 (layers x hidden)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        layers, hidden = PRESETS[name]
        fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      intermediate_size=4 * hidden)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown BertConfig fields {sorted(unknown)}")
        return cls(**d)
