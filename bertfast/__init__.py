"""bertfast: BERT pretraining (masked LM + next sentence prediction) with custom kernels on the hot paths.

    from bertfast import BertConfig, BertForPreTraining, ops
    from bertfast.data import load_data          # needs `datasets`; imported on demand
"""
from bertfast import ops, reference
from bertfast.model import BertConfig, BertForPreTraining, PreTrainingOutput

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertForPreTraining", "PreTrainingOutput", "ops", "reference", "__version__"]
