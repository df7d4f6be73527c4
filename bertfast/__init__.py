"""bertfast: BERT pretraining (masked LM + next sentence prediction) with custom kernels on the hot paths.

    from bertfast import BertConfig, BertForPreTraining, BertForSequenceClassification, ops
    from bertfast.data import load_data          # needs `datasets`; imported on demand
"""
from bertfast import ops, padding, reference
from bertfast.config import BertConfig
from bertfast.model import (BertForPreTraining, BertForSequenceClassification, BertModel, PreTrainingOutput,
                            SequenceClassifierOutput)

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForSequenceClassification", "PreTrainingOutput",
           "SequenceClassifierOutput", "ops", "padding", "reference", "__version__"]
