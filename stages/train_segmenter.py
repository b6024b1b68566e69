"""Stage `train_segmenter`: train one segmenter (the U-Net of params.yaml's `models`) with one seed."""

from medpipe.cli import stage_main
from medpipe.segmentation.unet_stage import TrainPaths, run

if __name__ == "__main__":
    stage_main(run, TrainPaths, __doc__)
