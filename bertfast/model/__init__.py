"""The model: BertConfig and its presets (config.py), the encoder and its heads (bert.py), conversion to and from
transformers' weights (hf.py). It builds on bertfast.ops and nothing above it."""
from bertfast.model.bert import (BertForPreTraining, BertForSequenceClassification, BertModel, PreTrainingOutput,
                                 SequenceClassifierOutput)
from bertfast.model.config import PRESETS, BertConfig

__all__ = ["BertConfig", "PRESETS", "BertModel", "BertForPreTraining", "BertForSequenceClassification",
           "PreTrainingOutput", "SequenceClassifierOutput"]
