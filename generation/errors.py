"""The error of bad generation inputs."""


class GenerationError(ValueError):
    """Bad inputs for generation (first frame, actions, model, checkpoint); the message says what and where."""
