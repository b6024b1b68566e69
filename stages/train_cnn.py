"""Stage `train_cnn`: the custom CNNs of the published studies (section `cnn` of params.yaml)."""

from medpipe import cli, config
from medpipe.models.efficientnet import WeightsError
from medpipe.training.classify import parse_stage_args, run_stage
from medpipe.training.loop import MonitorError

STAGE = "train_cnn"


def main() -> None:
    args, paths = parse_stage_args(STAGE, __doc__)
    run_stage(config.load_params(args.params), STAGE, paths, log_mlflow=not args.no_mlflow)


if __name__ == "__main__":
    cli.register_user_error(WeightsError, MonitorError)
    cli.run(main)
