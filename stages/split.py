"""Stage `split`: stratified, duplicate-grouped 70/15/15 split and training-split normalisation statistics."""

from medpipe.cli import stage_main
from medpipe.data.splitting import SplitPaths, run

if __name__ == "__main__":
    stage_main(run, SplitPaths, __doc__)
