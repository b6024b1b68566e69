"""Stage `preprocess`: crop/normalize: decode, crop and resize every image into one array file."""

from medpipe.cli import stage_main
from medpipe.data.preprocess import PreprocessPaths, run

if __name__ == "__main__":
    stage_main(run, PreprocessPaths, __doc__)
