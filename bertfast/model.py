"""BERT for pretraining (masked LM + next sentence prediction), built from bertfast.ops.

Post-LN BERT as in the paper and in transformers: embeddings (word + position + token type) -> LayerNorm ->
dropout; each layer: fused QKV -> attention -> dense -> LayerNorm(dropout(.) + residual) -> dense + GELU -> dense ->
LayerNorm(dropout(.) + residual); tanh pooler on [CLS]; MLM head dense + GELU + LayerNorm + decoder tied to the
word embeddings (+ bias); NSP head on the pooled output.

Two encoder layouts give the same numbers (tests/test_model.py):
- padded: every layer runs on [batch, seqlen, hidden] and attention masks the padding;
- unpadded (`unpad=True`, the default when an attention_mask is given): the padding is removed once after the
  embeddings, every layer runs on [total_tokens, hidden] with `varlen_attention`, and only the masked positions
  (MLM) and the [CLS] rows (NSP) are gathered for the heads. The one host-device synchronisation per step is the
  longest sequence length that varlen attention needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bertfast import ops, reference

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


class PreTrainingOutput:
    """Unpacks as (total_loss, prediction_scores, seq_relationship_score), like transformers' tuple output.

    prediction_scores: [num_rows, vocab] for the predicted positions when labels were given (with the static
    mlm_positions form, one row per slot, unused slots included: their `mlm_targets` are -100), else
    [batch, seqlen, vocab]. mlm_targets: the target of each prediction_scores row (None without labels)."""

    __slots__ = ("loss", "prediction_scores", "seq_relationship_score", "mlm_loss", "nsp_loss", "mlm_targets")

    def __init__(self, loss, prediction_scores, seq_relationship_score, mlm_loss=None, nsp_loss=None,
                 mlm_targets=None):
        self.loss = loss
        self.prediction_scores = prediction_scores
        self.seq_relationship_score = seq_relationship_score
        self.mlm_loss = mlm_loss
        self.nsp_loss = nsp_loss
        self.mlm_targets = mlm_targets

    def __iter__(self):
        return iter((self.loss, self.prediction_scores, self.seq_relationship_score))

    def __getitem__(self, i):
        return (self.loss, self.prediction_scores, self.seq_relationship_score)[i]

    def __len__(self):
        return 3


class LayerNorm(nn.Module):
    """Holds LayerNorm's parameters; the computation is ops.layer_norm (fused with bias, dropout, residual)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(h, 3 * h)  # query, key, value stacked: rows [0:h], [h:2h], [2h:3h]
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = LayerNorm(h, config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, i)
        self.ffn_out = nn.Linear(i, h)
        self.ffn_norm = LayerNorm(h, config.layer_norm_eps)

    def forward(self, h, attend, dropout_p: float, impl):
        """h [..., hidden] (padded [B, S, H] or unpadded [T, H]); attend(q, k, v) runs attention on that layout.

        With fused kernels (Triton on GPU) the dense layers' biases are added inside the LayerNorm and GELU
        kernels; with the torch reference they go into the matmul (addmm), which is cheaper there."""
        lead = h.shape[:-1]
        q, k, v = F.linear(h, self.qkv.weight, self.qkv.bias).view(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        ctx = attend(q, k, v).reshape(*lead, -1)  # [..., hidden]
        h = _dense_layer_norm(ctx, self.attn_out, self.attn_norm, h, dropout_p, impl("layer_norm"))
        f = _dense_gelu(h, self.ffn_in, impl("bias_gelu"))  # [..., intermediate]
        return _dense_layer_norm(f, self.ffn_out, self.ffn_norm, h, dropout_p, impl("layer_norm"))


def _fused(op: str, impl: str, device) -> bool:
    return ops.resolve_impl(op, impl, device) != "torch"


def _dense_gelu(x, dense: nn.Linear, impl: str):
    """GELU(dense(x)): the bias add fused into the GELU kernel when one runs."""
    if _fused("bias_gelu", impl, x.device):
        return ops.bias_gelu(F.linear(x, dense.weight), dense.bias, impl=impl)
    return ops.bias_gelu(F.linear(x, dense.weight, dense.bias), None, impl=impl)


def _dense_layer_norm(x, dense: nn.Linear, norm: LayerNorm, residual, dropout_p: float, impl: str):
    """LayerNorm(dropout(dense(x)) + residual): bias, dropout and residual fused into the LayerNorm kernel."""
    if _fused("layer_norm", impl, x.device):
        a = F.linear(x, dense.weight)
        return ops.layer_norm(a, norm.weight, norm.bias, norm.eps, residual.to(a.dtype), x_bias=dense.bias,
                              dropout_p=dropout_p, impl=impl)
    a = F.linear(x, dense.weight, dense.bias)
    return ops.layer_norm(a, norm.weight, norm.bias, norm.eps, residual.to(a.dtype), dropout_p=dropout_p, impl=impl)


class BertForPreTraining(nn.Module):
    """BERT with its two pretraining heads. `BertForPreTraining(config)` or the notebooks' keyword form
    `BertForPreTraining(vocab_size=..., hidden_size=..., ...)` (BertConfig's fields).

    impl: "auto" | "triton" | "ext" | "torch", or a dict {op name: impl} (missing ops use "auto"): which
    implementation each op in bertfast.ops runs with; a model-wide "triton" or "ext" applies to the ops that
    have it, the others run as with "auto". unpad: run the encoder on unpadded tokens when an
    attention_mask is given (same numbers, less work)."""

    def __init__(self, config: BertConfig | None = None, *, impl: str | dict = "auto", unpad: bool = True,
                 **kwargs):
        super().__init__()
        if config is None:
            config = BertConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"give either a BertConfig or keyword fields, not both (got {sorted(kwargs)})")
        self.config = config
        self.impl = impl
        self.unpad = unpad
        self.check_inputs = True  # value checks on input ids need a host sync; the trainer may turn them off
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_idx)
        self.position_embeddings = nn.Embedding(c.max_len, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        self.mlm_dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.mlm_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))  # the decoder's weight is word_embeddings'
        self.nsp = nn.Linear(c.hidden_size, 2)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """BERT's initialisation: normal(0, 0.02) weights, zero biases, LayerNorm 1 / 0, zero padding row."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _impl(self, op: str) -> str:
        if isinstance(self.impl, dict):
            return self.impl.get(op, "auto")
        return ops.op_impl(op, self.impl)

    # ------------------------------------------------------------------ input checks
    def _check(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label, mlm_positions,
               mlm_labels):
        c = self.config
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seqlen] tensor of token ids, got {shape}")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        b, s = input_ids.shape
        if s > c.max_len:
            raise ValueError(f"input_ids has seqlen {s} > max_len={c.max_len} (the model's position embeddings): "
                             f"truncate the inputs or build the model with a larger max_len")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("labels", labels)):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {(b, s)}: they must match")
        if (mlm_positions is None) != (mlm_labels is None):
            raise ValueError("mlm_positions and mlm_labels go together: give both or neither")
        if mlm_positions is not None:
            if labels is not None:
                raise ValueError("give labels ([batch, seqlen]) or mlm_positions/mlm_labels ([batch, P]), not both")
            if mlm_positions.dim() != 2 or mlm_positions.shape[0] != b or mlm_labels.shape != mlm_positions.shape:
                raise ValueError(f"mlm_positions {tuple(mlm_positions.shape)} and mlm_labels "
                                 f"{tuple(mlm_labels.shape)} must both be [batch={b}, P]")
        if next_sentence_label is not None and next_sentence_label.numel() != b:
            raise ValueError(f"next_sentence_label has {next_sentence_label.numel()} elements, expected one per "
                             f"sequence (batch={b})")
        if not self.check_inputs or input_ids.numel() == 0:
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= c.vocab_size:
            bad = hi if hi >= c.vocab_size else lo
            raise ValueError(f"input_ids holds token id {bad}, outside [0, vocab_size={c.vocab_size}): the "
                             f"tokenizer and the model disagree on the vocabulary")
        if token_type_ids is not None:
            lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
            if lo < 0 or hi >= c.type_vocab_size:
                raise ValueError(f"token_type_ids holds {hi if hi >= c.type_vocab_size else lo}, outside "
                                 f"[0, type_vocab_size={c.type_vocab_size})")
        if mlm_positions is not None and mlm_positions.numel():
            lo, hi = int(mlm_positions.min()), int(mlm_positions.max())
            if lo < -1 or hi >= s:
                raise ValueError(f"mlm_positions holds {hi if hi >= s else lo}, outside [-1, seqlen={s})")

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids, token_type_ids, position_ids):
        e = self.word_embeddings(input_ids)
        r = self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        h = ops.layer_norm(e, self.embed_norm.weight, self.embed_norm.bias, self.embed_norm.eps, r,
                           impl=self._impl("layer_norm"))
        return reference.dropout(h, self.config.dropout) if self.training and self.config.dropout > 0 else h

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None,
                mlm_positions=None, mlm_labels=None, unpad: bool | None = None) -> PreTrainingOutput:
        self._check(input_ids, attention_mask, token_type_ids, labels, next_sentence_label, mlm_positions,
                    mlm_labels)
        b, s = input_ids.shape
        dev = input_ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        unpad = self.unpad if unpad is None else unpad
        c = self.config
        hidden_p = c.dropout if self.training else 0.0
        attn_p = c.attention_dropout if self.training else 0.0

        if attention_mask is not None and unpad:
            keep = attention_mask.reshape(-1).bool()
            rows = keep.nonzero().squeeze(1)  # [T]: padded-layout row of each real token, sequence by sequence
            seqlens = attention_mask.bool().sum(1, dtype=torch.int32)  # [B]
            cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
            max_seqlen = int(seqlens.max()) if b else 0  # the host sync
            positions = rows % s
            h = self.embed(input_ids.reshape(-1)[rows], token_type_ids.reshape(-1)[rows], positions)  # [T, H]
            attend = lambda q, k, v: ops.varlen_attention(  # noqa: E731
                q, k, v, cu_seqlens, max_seqlen, attn_p, impl=self._impl("varlen_attention"))
            for layer in self.layers:
                h = layer(h, attend, hidden_p, self._impl)
            # packed row of each padded-layout position (-1 for padding): maps positions to rows of h
            packed = torch.full((b * s,), -1, dtype=torch.int64, device=dev)
            packed[rows] = torch.arange(rows.numel(), device=dev)
            # [CLS] is each sequence's first real token; an empty sequence pools a zero vector
            first = cu_seqlens[:-1].to(torch.int64).where(seqlens > 0, torch.full_like(seqlens, -1, dtype=torch.int64))
            cls = ops.mlm_gather(h[None], first[None], impl=self._impl("mlm_gather"))  # [B, H]
            hidden3d = h[None]  # [1, T, H]

            def to_rows(flat):  # flat padded-layout indices (-1 unused) -> [1, n] rows of hidden3d
                return torch.where(flat >= 0, packed[flat.clamp(min=0)], flat).view(1, -1)

            def full_sequence(x):  # [T, H] -> [B, S, H], zeros at padding
                return x.new_zeros(b * s, x.shape[-1]).index_copy(0, rows, x).view(b, s, -1)
        else:
            position_ids = torch.arange(s, device=dev).expand(b, s)
            h = self.embed(input_ids, token_type_ids, position_ids)  # [B, S, H]
            mask = attention_mask.bool() if attention_mask is not None else None
            attend = lambda q, k, v: ops.attention(  # noqa: E731
                q, k, v, mask, attn_p, impl=self._impl("attention"))
            for layer in self.layers:
                h = layer(h, attend, hidden_p, self._impl)
            cls = h[:, 0]  # [B, H]
            hidden3d = h.reshape(1, b * s, -1)

            def to_rows(flat):
                return flat.view(1, -1)

            def full_sequence(x):
                return x

        pooled = torch.tanh(self.pooler(cls))
        seq_relationship_score = self.nsp(pooled)  # [B, 2]

        mlm_targets = None
        if mlm_positions is not None:
            offsets = torch.arange(b, device=dev)[:, None] * s
            flat = torch.where(mlm_positions >= 0, mlm_positions + offsets, mlm_positions).reshape(-1)  # [B * P]
            mlm_targets = mlm_labels.reshape(-1)
        elif labels is not None:
            flat = (labels.reshape(-1) != -100).nonzero().squeeze(1)  # [num_predicted]
            mlm_targets = labels.reshape(-1)[flat]
        if mlm_targets is not None:
            g = ops.mlm_gather(hidden3d, to_rows(flat), impl=self._impl("mlm_gather"))  # [N, H]
            prediction_scores = self.mlm_logits(g)  # [N, V]
        else:
            prediction_scores = self.mlm_logits(full_sequence(h))  # [B, S, V]

        mlm_loss = nsp_loss = None
        if mlm_targets is not None:
            mlm_loss = ops.softmax_cross_entropy(prediction_scores, mlm_targets,
                                                 impl=self._impl("softmax_cross_entropy"))
        if next_sentence_label is not None:
            nsp_loss = ops.softmax_cross_entropy(seq_relationship_score, next_sentence_label.reshape(-1),
                                                 impl=self._impl("softmax_cross_entropy"))
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        total = losses[0] + losses[1] if len(losses) == 2 else (losses[0] if losses else None)
        return PreTrainingOutput(total, prediction_scores, seq_relationship_score, mlm_loss, nsp_loss, mlm_targets)

    def mlm_logits(self, h):
        """The MLM head: dense + GELU + LayerNorm, then the decoder tied to the word embeddings."""
        t = ops.bias_gelu(F.linear(h, self.mlm_dense.weight), self.mlm_dense.bias, impl=self._impl("bias_gelu"))
        t = ops.layer_norm(t, self.mlm_norm.weight, self.mlm_norm.bias, self.mlm_norm.eps,
                           impl=self._impl("layer_norm"))
        return F.linear(t, self.word_embeddings.weight, self.mlm_bias)

    # ------------------------------------------------------------------ Hugging Face weights
    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers.BertForPreTraining's names (loads with strict=True)."""
        from bertfast.hf import to_hf_state_dict

        return to_hf_state_dict(self)

    @classmethod
    def from_hf(cls, hf_model_or_state_dict, config: BertConfig | None = None, **kwargs) -> "BertForPreTraining":
        """A model with the weights of a transformers BertForPreTraining (a model, or its state dict)."""
        from bertfast.hf import from_hf

        return from_hf(cls, hf_model_or_state_dict, config, **kwargs)

