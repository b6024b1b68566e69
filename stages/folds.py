"""Stage `folds`: k-fold cross-validation folds of train + val (`cv.folds`), grouped, stratified, seeded."""

from medpipe.cli import stage_main
from medpipe.data.folds import FoldsPaths, run

if __name__ == "__main__":
    stage_main(run, FoldsPaths, __doc__)
