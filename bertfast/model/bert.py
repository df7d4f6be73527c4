"""BERT built from bertfast.ops: the encoder, the pretraining model (masked LM + next sentence prediction) and a
sequence classifier.

Post-LN BERT as in the paper and in transformers: embeddings (word + position + token type) -> LayerNorm ->
dropout; each layer: fused QKV -> attention -> dense -> LayerNorm(dropout(.) + residual) -> dense + GELU -> dense ->
LayerNorm(dropout(.) + residual); tanh pooler on [CLS]. Pretraining heads: MLM dense + GELU + LayerNorm + decoder
tied to the word embeddings (+ bias), NSP on the pooled output. Classifier: dropout + Linear on the pooled output.

Two encoder layouts give the same numbers (tests/test_model.py):
- padded: every layer runs on [batch, seqlen, hidden] and attention masks the padding;
- unpadded (`unpad=True`, the default when an attention_mask is given): the padding is removed once before the
  embeddings (bertfast.ops.padding), every layer runs on [total_tokens, hidden] with `varlen_attention`, and only the
  masked positions (MLM) and the [CLS] rows are gathered for the heads. The layout comes from the batch
  (`Batch.model_inputs()`: `unpad_indices`, `cu_seqlens`, `max_seqlen`, computed by the collator on the host, the
  token count padded to a bucket; then no host sync), or is derived from attention_mask (one host sync for the
  longest sequence). Bucket-padding rows hold the pad token at position 0 and stay inert (bertfast.ops).

Padding may be on the right (BERT's collators) or on the left: positions count from each sequence's first real
token and [CLS] is its first real token, in both layouts (so a left-padded sequence gives the same result as the
same sequence right-padded; transformers instead numbers positions from column 0). Each sequence's real tokens
must be one contiguous run; MLM targets on padding are refused (with `check_inputs`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bertfast import ops
from bertfast.model import hf
from bertfast.ops import padding, reference
from bertfast.model.config import PRESETS, BertConfig  # noqa: F401  (PRESETS: re-exported for the trainer and CLI)


# The varlen_attention impls tested to honour the padded-rows contract (bertfast.ops: zero outputs and zero
# dq/dk/dv at rows past cu_seqlens[-1], poisoned memory). With any other impl the model masks padded rows around
# the op (4 where() per layer, so NaN or garbage a kernel leaves in them cannot reach a weight). The Triton kernels
# write zeros there themselves (kernels/attention.py fill_padding_rows; tests/test_padded_rows.py, kernel alone).
PADDED_ROWS_HONOURED = frozenset({"torch", "triton"})


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


class SequenceClassifierOutput:
    """loss (None without labels) and logits [batch, num_labels]; unpacks as (loss, logits)."""

    __slots__ = ("loss", "logits")

    def __init__(self, loss, logits):
        self.loss = loss
        self.logits = logits

    def __iter__(self):
        return iter((self.loss, self.logits))

    def __getitem__(self, i):
        return (self.loss, self.logits)[i]

    def __len__(self):
        return 2


class LayerNorm(nn.Module):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim, computed by ops.layer_norm (one fused kernel)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x, residual=None, *, x_bias=None, dropout_p: float = 0.0, impl: str = "auto"):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual, x_bias=x_bias, dropout_p=dropout_p,
                              impl=impl)


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
        return norm(a, residual.to(a.dtype), x_bias=dense.bias, dropout_p=dropout_p, impl=impl)
    a = F.linear(x, dense.weight, dense.bias)
    return norm(a, residual.to(a.dtype), dropout_p=dropout_p, impl=impl)


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
        """h [..., hidden] (padded [B, S, H] or unpadded [T, H]); attend(qkv), qkv [..., 3, heads, head_dim], runs
        attention on that layout.

        With fused kernels (Triton on GPU) the dense layers' biases are added inside the LayerNorm and GELU
        kernels; with the torch reference they go into the matmul (addmm), which is cheaper there."""
        lead = h.shape[:-1]
        qkv = F.linear(h, self.qkv.weight, self.qkv.bias).view(*lead, 3, self.num_heads, self.head_dim)
        ctx = attend(qkv).reshape(*lead, -1)  # [..., hidden]
        h = _dense_layer_norm(ctx, self.attn_out, self.attn_norm, h, dropout_p, impl("layer_norm"))
        f = _dense_gelu(h, self.ffn_in, impl("bias_gelu"))  # [..., intermediate]
        return _dense_layer_norm(f, self.ffn_out, self.ffn_norm, h, dropout_p, impl("layer_norm"))


@dataclass
class EncoderOutput:
    """The last layer's hidden states in the layout they were computed in, and the pooled [CLS] vectors."""

    hidden: torch.Tensor  # padded [B, S, H], or unpadded [T, H] when layout is not None
    pooled: torch.Tensor  # [B, H]: tanh(pooler(first real token)); the pooler of a zero vector when empty
    layout: padding.VarlenLayout | None

    def rows(self) -> torch.Tensor:
        """The hidden states as one sequence of rows [1, B * S or T, H] (what ops.mlm_gather takes)."""
        return self.hidden.reshape(1, -1, self.hidden.shape[-1])

    def row_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat padded-layout positions (b * seqlen + column, -1 unused) -> indices into rows(), [1, N]."""
        return (flat if self.layout is None else self.layout.unpadded_rows(flat)).view(1, -1)

    def padded(self) -> torch.Tensor:
        """[B, S, H], zeros at padding in the unpadded layout."""
        return self.hidden if self.layout is None else self.layout.pad(self.hidden)


class BertModel(nn.Module):
    """The BERT encoder: embeddings, layers and the [CLS] pooler; the base of the models with heads. Its
    parameter names are the top-level names of BertForPreTraining's state dict.

    impl: "auto" | "triton" | "ext" | "torch", or a dict {op name: impl} (missing ops use "auto"): which
    implementation each op in bertfast.ops runs with; a model-wide "triton" or "ext" applies to the ops that
    have it, the others run as with "auto". unpad: run the encoder on unpadded tokens when an
    attention_mask is given (same numbers, less work). `gradient_checkpointing_enable()` recomputes each layer in
    the backward pass instead of keeping its activations (same losses and gradients, dropout included)."""

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
        # value checks of the inputs (here and in the ops) need a host sync; the trainer turns them off on CUDA.
        # The layout the model builds itself (cu_seqlens, [CLS] rows) is valid by construction: never re-checked.
        self.check_inputs = True
        self.gradient_checkpointing = False
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_idx)
        self.position_embeddings = nn.Embedding(c.max_len, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        # subclasses add their heads, then call self.apply(self._init_weights) once

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

    def gradient_checkpointing_enable(self):
        """Recompute each encoder layer in the backward pass (activation memory of one layer instead of all)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def _impl(self, op: str) -> str:
        if isinstance(self.impl, dict):
            return self.impl.get(op, "auto")
        return ops.op_impl(op, self.impl)

    # ------------------------------------------------------------------ input checks
    def _check_encoder_inputs(self, input_ids, attention_mask, token_type_ids):
        c = self.config
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seqlen] tensor of token ids, got {shape}")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        b, s = input_ids.shape
        if b == 0 or s == 0:
            raise ValueError(f"input_ids has shape {(b, s)}: a batch needs at least one sequence of at least one "
                             f"token")
        if s > c.max_len:
            raise ValueError(f"input_ids has seqlen {s} > max_len={c.max_len} (the model's position embeddings): "
                             f"truncate the inputs or build the model with a larger max_len")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {(b, s)}: they must match")
        if not self.check_inputs:
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
        if attention_mask is not None:
            padding.check_mask(attention_mask)

    # ------------------------------------------------------------------ the encoder
    def embed(self, input_ids, token_type_ids, position_ids):
        """LayerNorm(word + position + token type embeddings), then dropout; any layout ([B, S] or [T] ids)."""
        e = self.word_embeddings(input_ids)
        r = self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        h = self.embed_norm(e, r, impl=self._impl("layer_norm"))
        return reference.dropout(h, self.config.dropout) if self.training and self.config.dropout > 0 else h

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, unpad: bool | None = None,
               layout: padding.VarlenLayout | None = None) -> EncoderOutput:
        """Embeddings and every layer, in the unpadded layout when an attention_mask is given and unpad is on
        (the model's `unpad` when None), else padded; then the pooler on each sequence's first real token.
        layout: the unpadded layout the collator computed (bucket padding rows included); None: derived from
        attention_mask here (one host sync)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        unpad = self.unpad if unpad is None else unpad
        attn_p = self.config.attention_dropout if self.training else 0.0
        if attention_mask is not None and unpad:
            h, attend, cls_index, layout = self._unpadded_start(input_ids, attention_mask, token_type_ids, layout,
                                                                attn_p)
        else:
            h, attend, cls_index = self._padded_start(input_ids, attention_mask, token_type_ids, attn_p)
            layout = None
        h = self._layers(h, attend)
        hidden3d = h[None] if layout is not None else h
        cls = ops.mlm_gather(hidden3d, cls_index, impl=self._impl("mlm_gather"),  # [B, H], zeros when empty
                             check_values=False)
        return EncoderOutput(h, torch.tanh(self.pooler(cls)), layout)

    def _unpadded_start(self, input_ids, attention_mask, token_type_ids, layout, attn_p):
        """(embeddings [R, H], attend, [CLS] rows [1, B], layout). Bucket-padding rows get the pad token at
        position 0 with token type 0: finite activations that varlen attention keeps inert."""
        given = layout is not None  # the collator's layout may have padding rows; one derived here has none
        if layout is None:
            layout = padding.layout_from_mask(attention_mask)
        pad_id = self.config.pad_token_idx
        h = self.embed(layout.unpad(input_ids, pad_id), layout.unpad(token_type_ids), layout.position_ids())

        impl = self._impl("varlen_attention")
        guard = given and ops.resolve_impl("varlen_attention", impl, h.device) not in PADDED_ROWS_HONOURED
        real = layout.real_rows()[:, None, None] if guard else None

        def attend(qkv):  # packed: with Triton, qkv's gradient is the kernel's dq/dk/dv buffer (no stacking copy)
            if real is not None:  # an impl not yet known to honour padded rows: mask them around it
                qkv = torch.where(real[..., None], qkv, 0)  # zero gradient at padded rows
            out = ops.varlen_attention_qkvpacked(qkv, layout.cu_seqlens, layout.max_seqlen, attn_p, impl=impl,
                                                 check_values=False)
            return out if real is None else torch.where(real, out, 0)
        return h, attend, layout.first_token_index()[None], layout  # [CLS] rows of [1, R, H]; -1: empty

    def _padded_start(self, input_ids, attention_mask, token_type_ids, attn_p):
        """(embeddings [B, S, H], attend, [CLS] columns [B, 1]) of the padded layout."""
        b, s = input_ids.shape
        first = (torch.zeros(b, dtype=torch.int64, device=input_ids.device) if attention_mask is None
                 else padding.first_token_columns(attention_mask))  # [B]
        position_ids = (torch.arange(s, device=input_ids.device)[None, :] - first[:, None]).clamp(min=0)
        h = self.embed(input_ids, token_type_ids, position_ids)  # [B, S, H]
        mask = attention_mask.bool() if attention_mask is not None else None

        def attend(qkv):
            return ops.attention(*qkv.unbind(-3), mask, attn_p, impl=self._impl("attention"))
        if mask is not None:
            first = torch.where(mask.any(1), first, torch.full_like(first, -1))
        return h, attend, first[:, None]  # columns of [B, S, H]; -1: an empty sequence

    def given_layout(self, input_ids, attention_mask, unpad_indices, cu_seqlens, max_seqlen
                     ) -> padding.VarlenLayout | None:
        """The collator's layout from its three parts (None when not given); with check_inputs, checked against
        attention_mask (a host sync)."""
        parts = (unpad_indices, cu_seqlens, max_seqlen)
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts) or attention_mask is None:
            raise ValueError("unpad_indices, cu_seqlens and max_seqlen go together, with an attention_mask: give "
                             "all four or none of the three (Batch.model_inputs does)")
        b, s = input_ids.shape
        layout = padding.VarlenLayout(unpad_indices, cu_seqlens, int(max_seqlen), b, s)
        if self.check_inputs:
            _check_layout(layout, attention_mask)
        return layout
    def _layers(self, h, attend):
        dropout_p = self.config.dropout if self.training else 0.0
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # the recomputation replays torch's RNG state (preserve_rng_state), so dropout masks match
                h = checkpoint(layer, h, attend, dropout_p, self._impl, use_reentrant=False)
            else:
                h = layer(h, attend, dropout_p, self._impl)
        return h

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, unpad: bool | None = None):
        """(sequence_output [B, S, H] with zeros at padding, pooled_output [B, H]), as transformers' BertModel."""
        self._check_encoder_inputs(input_ids, attention_mask, token_type_ids)
        enc = self.encode(input_ids, attention_mask, token_type_ids, unpad)
        return enc.padded(), enc.pooled


class BertForPreTraining(BertModel):
    """BERT with its two pretraining heads. `BertForPreTraining(config)` or the notebooks' keyword form
    `BertForPreTraining(vocab_size=..., hidden_size=..., ...)` (BertConfig's fields). impl, unpad and gradient
    checkpointing: see BertModel."""

    hf_class_name = "BertForPreTraining"

    def __init__(self, config: BertConfig | None = None, *, impl: str | dict = "auto", unpad: bool = True,
                 **kwargs):
        super().__init__(config, impl=impl, unpad=unpad, **kwargs)
        c = self.config
        self.mlm_dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.mlm_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))  # the decoder's weight is word_embeddings'
        self.nsp = nn.Linear(c.hidden_size, 2)
        self.apply(self._init_weights)

    def _check(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label, mlm_positions,
               mlm_labels):
        self._check_encoder_inputs(input_ids, attention_mask, token_type_ids)
        b, s = input_ids.shape
        if labels is not None and tuple(labels.shape) != (b, s):
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {(b, s)}: they must match")
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
        if not self.check_inputs:
            return
        if mlm_positions is not None and mlm_positions.numel():
            lo, hi = int(mlm_positions.min()), int(mlm_positions.max())
            if lo < -1 or hi >= s:
                raise ValueError(f"mlm_positions holds {hi if hi >= s else lo}, outside [-1, seqlen={s})")
            if attention_mask is not None:
                on_pad = (mlm_positions >= 0) & ~attention_mask.bool().gather(1, mlm_positions.clamp(min=0))
                if bool(on_pad.any()):
                    i, j = on_pad.nonzero()[0].tolist()
                    raise ValueError(f"mlm_positions[{i}, {j}] = {int(mlm_positions[i, j])} points at padding "
                                     f"(attention_mask is 0 there): MLM targets must be real tokens")
        if labels is not None and attention_mask is not None:
            on_pad = (labels != -100) & ~attention_mask.bool()
            if bool(on_pad.any()):
                i, j = on_pad.nonzero()[0].tolist()
                raise ValueError(f"labels[{i}, {j}] = {int(labels[i, j])} is a target on padding (attention_mask is "
                                 f"0 there): use -100 at padding")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None,
                mlm_positions=None, mlm_labels=None, unpad: bool | None = None, *, unpad_indices=None,
                cu_seqlens=None, max_seqlen=None, detach_scores: bool = False) -> PreTrainingOutput:
        """unpad_indices, cu_seqlens, max_seqlen: the unpadded layout a Batch carries (bucket-padded; see
        bertfast.data.Batch); without them the layout is derived from attention_mask (one host sync).
        detach_scores: return prediction_scores and seq_relationship_score detached (the losses keep their graph),
        as the trainer does, whose accuracy metrics are all it reads from them: under torch.compile a returned
        tensor that requires grad gets a zero-filled gradient in the backward ([N, vocab] per step)."""
        self._check(input_ids, attention_mask, token_type_ids, labels, next_sentence_label, mlm_positions,
                    mlm_labels)
        layout = self.given_layout(input_ids, attention_mask, unpad_indices, cu_seqlens, max_seqlen)
        enc = self.encode(input_ids, attention_mask, token_type_ids, unpad, layout)
        seq_relationship_score = self.nsp(enc.pooled)  # [B, 2]

        flat, mlm_targets = _mlm_targets(input_ids.shape, labels, mlm_positions, mlm_labels)
        if mlm_targets is not None:
            g = ops.mlm_gather(enc.rows(), enc.row_index(flat), impl=self._impl("mlm_gather"),  # [N, H]
                               check_values=self.check_inputs)
            prediction_scores = self.mlm_logits(g)  # [N, V]
        else:
            prediction_scores = self.mlm_logits(enc.padded())  # [B, S, V]

        mlm_loss = nsp_loss = None
        if mlm_targets is not None:
            mlm_loss = ops.softmax_cross_entropy(prediction_scores, mlm_targets,
                                                 impl=self._impl("softmax_cross_entropy"),
                                                 check_values=self.check_inputs)
        if next_sentence_label is not None:
            nsp_loss = ops.softmax_cross_entropy(seq_relationship_score, next_sentence_label.reshape(-1),
                                                 impl=self._impl("softmax_cross_entropy"),
                                                 check_values=self.check_inputs)
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        total = losses[0] + losses[1] if len(losses) == 2 else (losses[0] if losses else None)
        if detach_scores:
            prediction_scores, seq_relationship_score = prediction_scores.detach(), seq_relationship_score.detach()
        return PreTrainingOutput(total, prediction_scores, seq_relationship_score, mlm_loss, nsp_loss, mlm_targets)

    def mlm_logits(self, h):
        """The MLM head: dense + GELU + LayerNorm, then the decoder tied to the word embeddings."""
        t = ops.bias_gelu(F.linear(h, self.mlm_dense.weight), self.mlm_dense.bias, impl=self._impl("bias_gelu"))
        t = self.mlm_norm(t, impl=self._impl("layer_norm"))
        return F.linear(t, self.word_embeddings.weight, self.mlm_bias)

    # ------------------------------------------------------------------ Hugging Face weights
    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers.BertForPreTraining's names (loads with strict=True)."""
        return hf.to_hf_state_dict(self)

    @classmethod
    def from_hf(cls, hf_model_or_state_dict, config: BertConfig | None = None, **kwargs) -> "BertForPreTraining":
        """A model with the weights of a transformers BertForPreTraining (a model, or its state dict)."""
        return hf.from_hf(cls, hf_model_or_state_dict, config, **kwargs)


def _check_layout(layout: padding.VarlenLayout, attention_mask) -> None:
    """ValueError unless a given layout is attention_mask's: its real rows, its cu_seqlens, a large enough
    max_seqlen, and bucket-padding rows holding batch * seqlen."""
    own = padding.layout_from_mask(attention_mask)
    ind, n = layout.indices, own.total
    ok = (ind.dim() == 1 and ind.dtype == torch.int64 and ind.numel() >= n and layout.cu_seqlens.dtype == torch.int32
          and torch.equal(layout.cu_seqlens.cpu(), own.cu_seqlens.cpu()) and layout.max_seqlen >= own.max_seqlen
          and torch.equal(ind[:n].cpu(), own.indices.cpu()) and bool((ind[n:] == layout.pad_slot).all()))
    if not ok:
        raise ValueError("unpad_indices / cu_seqlens / max_seqlen do not describe attention_mask's real tokens "
                         "(build them with bertfast.ops.padding.batch_layout, as the collator does)")


def _mlm_targets(shape, labels, mlm_positions, mlm_labels):
    """(flat padded-layout positions [N] (-1 unused), their targets [N]) of the MLM predictions, or (None, None).
    The static form keeps one slot per position (no host sync); the labels form keeps the labelled positions."""
    b, s = shape
    if mlm_positions is not None:
        offsets = torch.arange(b, device=mlm_positions.device)[:, None] * s
        flat = torch.where(mlm_positions >= 0, mlm_positions + offsets, mlm_positions).reshape(-1)  # [B * P]
        return flat, mlm_labels.reshape(-1)
    if labels is not None:
        flat = (labels.reshape(-1) != -100).nonzero().squeeze(1)  # [num_predicted]
        return flat, labels.reshape(-1)[flat]
    return None, None


PROBLEM_TYPES = ("single_label_classification", "regression")


class BertForSequenceClassification(BertModel):
    """BERT with a classification (or regression) head on the pooled [CLS] vector: dropout + Linear, as
    transformers' BertForSequenceClassification. The same encoder and kernels as BertForPreTraining (unpadded when
    an attention_mask is given).

    problem_type: "single_label_classification" (labels: class ids [batch], -100 ignored; cross-entropy) or
    "regression" (labels: floats [batch] or [batch, num_labels]; mean squared error); None: regression when
    num_labels == 1, else single-label classification."""

    hf_class_name = "BertForSequenceClassification"

    def __init__(self, config: BertConfig | None = None, num_labels: int = 2, problem_type: str | None = None, *,
                 impl: str | dict = "auto", unpad: bool = True, **kwargs):
        super().__init__(config, impl=impl, unpad=unpad, **kwargs)
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels={num_labels!r}: must be a positive integer")
        if problem_type is None:
            problem_type = "regression" if num_labels == 1 else "single_label_classification"
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r}: choose one of {PROBLEM_TYPES} (or None)")
        if problem_type == "single_label_classification" and num_labels < 2:
            raise ValueError("single_label_classification needs num_labels >= 2 (num_labels=1 is regression)")
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        self.apply(self._init_weights)

    def _check_labels(self, labels, b: int):
        if self.problem_type == "regression":
            if not labels.dtype.is_floating_point:
                raise ValueError(f"labels must be floats for regression, got dtype {labels.dtype}")
            if labels.numel() != b * self.num_labels:
                raise ValueError(f"labels has shape {tuple(labels.shape)}: regression with num_labels="
                                 f"{self.num_labels} needs {b * self.num_labels} values for batch={b}")
            return
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids for classification, got dtype {labels.dtype}")
        if labels.numel() != b:
            raise ValueError(f"labels has shape {tuple(labels.shape)}: expected one class id per sequence "
                             f"(batch={b})")
        if self.check_inputs:
            bad = (labels != -100) & ((labels < 0) | (labels >= self.num_labels))
            if bool(bad.any()):
                raise ValueError(f"labels holds {int(labels[bad][0])}, outside [0, num_labels={self.num_labels}) "
                                 f"(-100 = ignored)")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                unpad: bool | None = None) -> SequenceClassifierOutput:
        self._check_encoder_inputs(input_ids, attention_mask, token_type_ids)
        if labels is not None:
            self._check_labels(labels, input_ids.shape[0])
        pooled = self.encode(input_ids, attention_mask, token_type_ids, unpad).pooled  # [B, H]
        if self.training and self.config.dropout > 0:
            pooled = reference.dropout(pooled, self.config.dropout)
        logits = self.classifier(pooled)  # [B, num_labels]
        loss = None
        if labels is not None and self.problem_type == "regression":
            loss = F.mse_loss(logits.reshape(-1).float(), labels.reshape(-1).float())
        elif labels is not None:
            loss = ops.softmax_cross_entropy(logits, labels.reshape(-1), impl=self._impl("softmax_cross_entropy"),
                                             check_values=self.check_inputs)
        return SequenceClassifierOutput(loss, logits)

    # ------------------------------------------------------------------ weights from elsewhere
    @classmethod
    def from_pretraining(cls, model_or_state_dict, num_labels: int = 2, problem_type: str | None = None,
                         config: BertConfig | None = None, **kwargs) -> "BertForSequenceClassification":
        """The encoder (embeddings, layers, pooler) of a bertfast BertForPreTraining (the model, or its state
        dict with a `config=`) and a freshly initialised classifier (listed in `model.fresh_parameters`); the
        pretraining heads are dropped."""
        src = model_or_state_dict
        if isinstance(src, BertModel):
            config = config or src.config
            sd = src.state_dict()
        elif isinstance(src, dict):
            if config is None:
                raise ValueError("from_pretraining(state_dict) needs config= (the BertConfig it was trained with)")
            sd = src
        else:
            raise TypeError(f"from_pretraining takes a bertfast BertForPreTraining or its state dict, got "
                            f"{type(src).__name__}")
        model = cls(config, num_labels, problem_type, **kwargs)
        encoder = [k for k in model.state_dict() if not k.startswith("classifier.")]
        missing = [k for k in encoder if k not in sd]
        if missing:
            raise ValueError(f"not a bertfast BertForPreTraining state dict: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        model.load_state_dict({k: sd[k] for k in encoder}, strict=False)
        model.fresh_parameters = ["classifier.weight", "classifier.bias"]
        return model

    @classmethod
    def from_hf(cls, hf_model_or_state_dict, config: BertConfig | None = None, num_labels: int | None = None,
                problem_type: str | None = None, **kwargs) -> "BertForSequenceClassification":
        """A classifier with the weights of a transformers BertForSequenceClassification, BertModel,
        BertForMaskedLM or BertForPreTraining (a model or its state dict). Weights it lacks (the classifier, the
        pooler of a BertForMaskedLM) are freshly initialised and listed in `model.fresh_parameters`; pretraining
        heads are ignored. num_labels: from the classifier's weights when present, else 2."""
        if isinstance(hf_model_or_state_dict, BertModel):  # a bertfast model: its encoder
            return cls.from_pretraining(hf_model_or_state_dict, 2 if num_labels is None else num_labels,
                                        problem_type, config, **kwargs)
        return hf.classifier_from_hf(cls, hf_model_or_state_dict, config, num_labels, problem_type, **kwargs)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers.BertForSequenceClassification's names (loads with strict=True)."""
        return hf.to_hf_state_dict(self)
