"""Stage `train`: train one deep classifier (of params.yaml's `models`) with one seed."""

from medpipe.cli import stage_main
from medpipe.training.stage import TrainPaths, run

if __name__ == "__main__":
    stage_main(run, TrainPaths, __doc__)
