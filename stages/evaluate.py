"""Stage `evaluate`: score every selected model on the test split: headline metrics, per-image predictions, verdicts, champion."""

from medpipe.cli import stage_main
from medpipe.evaluation.stage import EvaluatePaths, run

if __name__ == "__main__":
    stage_main(run, EvaluatePaths, __doc__)
