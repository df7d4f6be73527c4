"""bertfast: BERT pretraining (masked LM + next sentence prediction) with custom kernels on the hot paths.

    from bertfast import BertConfig, BertForPreTraining, BertForSequenceClassification, ops
    from bertfast.data import load_data          # needs `datasets`; imported on demand
    from bertfast.train import TrainConfig, train

The package, by role (the data flows one way: data -> model (ops -> kernels / _C) -> loss -> train):
    ops/         the public ops and their backends; padding.py (the unpadded layout), reference.py (plain PyTorch)
    kernels/     the Triton kernels (the repository's top-level kernels/ folder)
    data/        corpora, tokenizer, sentence pairs, masking, batches, loaders
    model/       BertConfig, the encoder and its heads, transformers conversion
    train/       the pretraining loop, its config, plan, state, ranks, checkpoints, optimizers, evaluation
    downstream/  what is done with a trained model: fine-tuning, its tasks, fill-mask
    pretrain.py, finetune.py, fill_mask.py, plot.py   the command-line programs (`python -m bertfast.<name>`)
"""
from bertfast import ops
from bertfast.model.bert import (BertForPreTraining, BertForSequenceClassification, BertModel, PreTrainingOutput,
                                 SequenceClassifierOutput)
from bertfast.model.config import BertConfig
from bertfast.ops import padding, reference

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForSequenceClassification", "PreTrainingOutput",
           "SequenceClassifierOutput", "ops", "padding", "reference", "__version__"]
