"""Training: config, DeepSpeed launch, HF Trainer extensions, atomic checkpoints."""
