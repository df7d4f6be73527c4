"""Pretraining: the loop as named steps over one run state (trainer.py), its settings (config.py: TrainConfig, each
field a CLI flag), the checks that need the output folder (plan.py), the counters and metric sums (state.py), ranks,
devices and the graceful stop (dist.py), checkpoints (checkpoint.py) and loading any pretrained model
(pretrained.py: it reads checkpoints, so it lives beside them), optimizers (optim.py: LAMB), precision, FLOPs,
held-out evaluation and the metrics plot.

    from bertfast.train import TrainConfig, train
"""


def __getattr__(name):  # `from bertfast.train import train` without importing the loop (and datasets) eagerly
    if name in ("train", "TrainConfig"):
        from bertfast.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'bertfast.train' has no attribute {name!r}")
