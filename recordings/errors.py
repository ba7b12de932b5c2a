"""The one error type for bad recordings and data settings."""


class DataError(ValueError):
    """Bad input data or settings. Holds every problem found, each naming its file (and line)."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
