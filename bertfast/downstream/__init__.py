"""What is done with a pretrained model: fine-tuning on a classification or regression task (finetune.py), the
tasks it knows (tasks.py: GLUE, files, the built-in acceptability task) and fill-mask (fill_mask.py)."""
