"""Training methods and the machinery they share: ranks, precision, schedules, EMA, epochs."""
