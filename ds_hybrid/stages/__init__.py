"""Training stages: align, kl, finetune, select."""
