"""Conversion between bertfast's BertForPreTraining and transformers' (weights both ways, config, export)."""
from __future__ import annotations

import os

import torch

from bertfast.model import BertConfig

_LAYER = {  # bertfast layer param -> transformers layer param (under bert.encoder.layer.{i}.)
    "attn_out.weight": "attention.output.dense.weight",
    "attn_out.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight",
    "attn_norm.bias": "attention.output.LayerNorm.bias",
    "ffn_in.weight": "intermediate.dense.weight",
    "ffn_in.bias": "intermediate.dense.bias",
    "ffn_out.weight": "output.dense.weight",
    "ffn_out.bias": "output.dense.bias",
    "ffn_norm.weight": "output.LayerNorm.weight",
    "ffn_norm.bias": "output.LayerNorm.bias",
}
_TOP = {  # bertfast param -> transformers param
    "word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "bert.embeddings.LayerNorm.weight",
    "embed_norm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}
_QKV = ("query", "key", "value")


def to_hf_config(config: BertConfig):
    import transformers

    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act="gelu", hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_len, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_idx)


def from_hf_config(hf_config) -> BertConfig:
    act = getattr(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r}: bertfast implements BERT's exact erf GELU ('gelu') only")
    return BertConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, max_len=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob, layer_norm_eps=hf_config.layer_norm_eps,
        pad_token_idx=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """model's weights under transformers.BertForPreTraining's names (copies; loads with strict=True)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.clone() for k, v in convert_to_hf(sd, model.config).items()}


def convert_to_hf(sd: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Rename a {bertfast name: tensor} dict (weights, or their gradients) to transformers' names; the fused QKV
    is split into views. The tied decoder weight and bias appear under both of transformers' names."""
    h = config.hidden_size
    out = {theirs: sd[ours] for ours, theirs in _TOP.items()}
    for i in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}."
        for part, name in enumerate(_QKV):
            out[pre + f"attention.self.{name}.weight"] = sd[f"layers.{i}.qkv.weight"][part * h:(part + 1) * h]
            out[pre + f"attention.self.{name}.bias"] = sd[f"layers.{i}.qkv.bias"][part * h:(part + 1) * h]
        for ours, theirs in _LAYER.items():
            out[pre + theirs] = sd[f"layers.{i}.{ours}"]
    out["cls.predictions.decoder.weight"] = sd["word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = sd["mlm_bias"]
    return out


def _infer_config(sd: dict[str, torch.Tensor]) -> BertConfig:
    vocab, hidden = sd["bert.embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer."))
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64),
                      intermediate_size=sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_len=sd["bert.embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0])


def from_hf(cls, hf_model_or_state_dict, config: BertConfig | None = None, **kwargs):
    """Build `cls` (BertForPreTraining) holding the weights of a transformers BertForPreTraining.

    With a state dict and no config, the sizes are read from the tensors and heads = hidden / 64 (pass
    `config=` when a checkpoint uses another head size)."""
    src = hf_model_or_state_dict
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        if config is None:
            config = from_hf_config(src.config)
        sd = src.state_dict()
    elif isinstance(src, dict):
        sd = dict(src)
    else:
        raise TypeError(f"from_hf takes a transformers BertForPreTraining or its state dict, got {type(src).__name__}")
    if not any(k.startswith("bert.") for k in sd):  # a bare BertModel state dict
        sd = {("bert." + k if not k.startswith("cls.") else k): v for k, v in sd.items()}
    missing = [k for k in list(_TOP.values()) + ["bert.encoder.layer.0.attention.self.query.weight"] if k not in sd]
    if missing:
        raise ValueError(f"not a BertForPreTraining state dict: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if config is None:
        config = _infer_config(sd)
    model = cls(config, **kwargs)
    ours = {}
    for k, theirs in _TOP.items():
        ours[k] = sd[theirs]
    for i in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}."
        ours[f"layers.{i}.qkv.weight"] = torch.cat([sd[pre + f"attention.self.{n}.weight"] for n in _QKV])
        ours[f"layers.{i}.qkv.bias"] = torch.cat([sd[pre + f"attention.self.{n}.bias"] for n in _QKV])
        for k, theirs in _LAYER.items():
            ours[f"layers.{i}.{k}"] = sd[pre + theirs]
    model.load_state_dict(ours, strict=True)
    return model


def export_hf(model, output_dir: str | os.PathLike, tokenizer=None) -> str:
    """Write config.json, model.safetensors (and the tokenizer) so that
    transformers.BertForPreTraining.from_pretrained(output_dir) loads the model."""
    import transformers

    os.makedirs(output_dir, exist_ok=True)
    hf = transformers.BertForPreTraining(to_hf_config(model.config))
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    hf.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return str(output_dir)
