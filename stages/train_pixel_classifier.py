"""Stage `train_pixel_classifier`: the classical pixel classifier for lesion segmentation (datasets with masks)."""

from medpipe.cli import stage_main
from medpipe.segmentation.pixel_classifier_stage import PixelClassifierPaths, run

if __name__ == "__main__":
    stage_main(run, PixelClassifierPaths, __doc__)
