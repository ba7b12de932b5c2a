"""The demo world, its recording and the tiny models of the --demo runs: the whole pipeline without a studio's data."""
