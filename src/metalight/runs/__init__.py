"""A run: its config checks, training entry point, checkpoints (atomic writes, resume, pre-emption), DDP launch and results."""
