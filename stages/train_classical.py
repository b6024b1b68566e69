"""Stage `train_classical`: kNN, RBF SVM, random forest and soft voting on image features."""

from medpipe.cli import stage_main
from medpipe.classical.stage import ClassicalPaths, run

if __name__ == "__main__":
    stage_main(run, ClassicalPaths, __doc__)
