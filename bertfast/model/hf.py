"""Conversion between bertfast's models and transformers' (weights both ways, config, export).

bertfast name -> transformers name: the encoder (embeddings, layers, pooler) lives under `bert.` in transformers'
models with heads; BertForPreTraining's heads under `cls.`, BertForSequenceClassification's under `classifier.`.
The fused QKV weight is transformers' query, key and value stacked. This module depends on bertfast.model.config only;
the models call it (no import cycle)."""
from __future__ import annotations

import os

import torch

from bertfast.model.config import BertConfig

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
_EMBEDDINGS = {  # bertfast param -> transformers param
    "word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "bert.embeddings.LayerNorm.weight",
    "embed_norm.bias": "bert.embeddings.LayerNorm.bias",
}
_POOLER = {"pooler.weight": "bert.pooler.dense.weight", "pooler.bias": "bert.pooler.dense.bias"}
_PRETRAINING_HEADS = {
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}
_CLASSIFIER = {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
_TOP = {**_EMBEDDINGS, **_POOLER, **_PRETRAINING_HEADS}  # BertForPreTraining's non-layer params
_QKV = ("query", "key", "value")


def to_hf_config(config: BertConfig, **extra):
    """A transformers.BertConfig of the same sizes; `extra` (e.g. num_labels, problem_type) passed on."""
    import transformers

    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act="gelu", hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_len, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_idx, **extra)


def from_hf_config(hf_config) -> BertConfig:
    act = getattr(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r}: bertfast implements BERT's exact erf GELU ('gelu') only")
    dropout = getattr(hf_config, "classifier_dropout", None)
    if dropout is not None and dropout != hf_config.hidden_dropout_prob:
        raise ValueError(f"classifier_dropout={dropout} differs from hidden_dropout_prob="
                         f"{hf_config.hidden_dropout_prob}: bertfast's classifier uses the hidden dropout")
    return BertConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, max_len=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob, layer_norm_eps=hf_config.layer_norm_eps,
        pad_token_idx=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)


def _hf_extra(model) -> dict:
    if hasattr(model, "num_labels"):
        return dict(num_labels=model.num_labels, problem_type=model.problem_type)
    return {}


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """model's weights under the names of its transformers class (`model.hf_class_name`; copies; loads with
    strict=True)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return {k: v.clone() for k, v in convert_to_hf(sd, model.config).items()}


def convert_to_hf(sd: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Rename a {bertfast name: tensor} dict (weights, or their gradients) to transformers' names; the fused QKV
    is split into views. The heads present in `sd` are converted: BertForPreTraining's (the tied decoder weight
    and bias appear under both of transformers' names) or the classifier."""
    h = config.hidden_size
    names = {**_EMBEDDINGS, **_POOLER}
    if "mlm_bias" in sd:
        names.update(_PRETRAINING_HEADS)
    if "classifier.weight" in sd:
        names.update(_CLASSIFIER)
    out = {theirs: sd[ours] for ours, theirs in names.items()}
    for i in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}."
        for part, name in enumerate(_QKV):
            out[pre + f"attention.self.{name}.weight"] = sd[f"layers.{i}.qkv.weight"][part * h:(part + 1) * h]
            out[pre + f"attention.self.{name}.bias"] = sd[f"layers.{i}.qkv.bias"][part * h:(part + 1) * h]
        for ours, theirs in _LAYER.items():
            out[pre + theirs] = sd[f"layers.{i}.{ours}"]
    if "mlm_bias" in sd:
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


def _source(src, what: str):
    """(state dict under `bert.`-prefixed names, the transformers config or None) of a model or a state dict."""
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        hf_config, sd = src.config, src.state_dict()
    elif isinstance(src, dict):
        hf_config, sd = None, dict(src)
    else:
        raise TypeError(f"from_hf takes a transformers {what} or its state dict, got {type(src).__name__}")
    if not any(k.startswith("bert.") for k in sd):  # a bare BertModel state dict
        sd = {(k if k.startswith(("cls.", "classifier.")) else "bert." + k): v for k, v in sd.items()}
    return sd, hf_config


def _require(sd, names, what: str):
    missing = [k for k in names if k not in sd]
    if missing:
        raise ValueError(f"not a {what} state dict: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _to_bertfast(sd: dict[str, torch.Tensor], config: BertConfig, top: dict[str, str]) -> dict[str, torch.Tensor]:
    """transformers-named `sd` -> bertfast names: the layers and the `top` params present in `sd`."""
    ours = {k: sd[theirs] for k, theirs in top.items() if theirs in sd}
    for i in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{i}."
        ours[f"layers.{i}.qkv.weight"] = torch.cat([sd[pre + f"attention.self.{n}.weight"] for n in _QKV])
        ours[f"layers.{i}.qkv.bias"] = torch.cat([sd[pre + f"attention.self.{n}.bias"] for n in _QKV])
        for k, theirs in _LAYER.items():
            ours[f"layers.{i}.{k}"] = sd[pre + theirs]
    return ours


def from_hf(cls, hf_model_or_state_dict, config: BertConfig | None = None, **kwargs):
    """Build `cls` (BertForPreTraining) holding the weights of a transformers BertForPreTraining.

    With a state dict and no config, the sizes are read from the tensors and heads = hidden / 64 (pass
    `config=` when a checkpoint uses another head size)."""
    sd, hf_config = _source(hf_model_or_state_dict, "BertForPreTraining")
    _require(sd, list(_TOP.values()) + ["bert.encoder.layer.0.attention.self.query.weight"], "BertForPreTraining")
    if config is None:
        config = from_hf_config(hf_config) if hf_config is not None else _infer_config(sd)
    model = cls(config, **kwargs)
    model.load_state_dict(_to_bertfast(sd, config, _TOP), strict=True)
    return model


def classifier_from_hf(cls, hf_model_or_state_dict, config: BertConfig | None = None, num_labels: int | None = None,
                       problem_type: str | None = None, **kwargs):
    """Build `cls` (BertForSequenceClassification) from the weights of a transformers BertForSequenceClassification,
    BertModel, BertForMaskedLM or BertForPreTraining; what the source lacks (classifier, pooler) keeps its fresh
    initialisation and is listed in `model.fresh_parameters`."""
    what = "BertModel / BertForMaskedLM / BertForPreTraining / BertForSequenceClassification"
    sd, hf_config = _source(hf_model_or_state_dict, what)
    _require(sd, list(_EMBEDDINGS.values()) + ["bert.encoder.layer.0.attention.self.query.weight"], what)
    if config is None:
        config = from_hf_config(hf_config) if hf_config is not None else _infer_config(sd)
    has_classifier = "classifier.weight" in sd
    if has_classifier:
        found = sd["classifier.weight"].shape[0]
        if num_labels is not None and num_labels != found:
            raise ValueError(f"num_labels={num_labels} but the source's classifier has {found} labels: drop "
                             f"num_labels, or load the encoder alone (leave out the classifier.* weights)")
        num_labels = found
        if problem_type is None and hf_config is not None:
            problem_type = getattr(hf_config, "problem_type", None)
    model = cls(config, 2 if num_labels is None else num_labels, problem_type, **kwargs)
    ours = _to_bertfast(sd, config, {**_EMBEDDINGS, **_POOLER, **_CLASSIFIER})
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected, unexpected
    model.fresh_parameters = list(missing)
    return model


def export_hf(model, output_dir: str | os.PathLike, tokenizer=None) -> str:
    """Write config.json, model.safetensors (and the tokenizer) so that transformers'
    `<model.hf_class_name>.from_pretrained(output_dir)` loads the model (BertForPreTraining or
    BertForSequenceClassification)."""
    import transformers

    os.makedirs(output_dir, exist_ok=True)
    hf_cls = getattr(transformers, model.hf_class_name)
    hf = hf_cls(to_hf_config(model.config, **_hf_extra(model)))
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    hf.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return str(output_dir)
