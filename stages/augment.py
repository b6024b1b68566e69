"""Stage `augment`: augment/balance: augmented copies balance the classes of the training split only."""

from medpipe.cli import stage_main
from medpipe.data.augment import AugmentPaths, run

if __name__ == "__main__":
    stage_main(run, AugmentPaths, __doc__)
