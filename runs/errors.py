"""The error that ends a run (training or distillation)."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what is still valid on disk."""
