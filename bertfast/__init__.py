"""bertfast: BERT pretraining (masked LM + next sentence prediction) with custom kernels on the hot paths."""
__version__ = "0.1.0"
