"""Stage `download`: copy (offline mirror) or download the dataset's files into data/raw/, checksum-verified."""

from medpipe.cli import stage_main
from medpipe.data.download import DownloadPaths, run

if __name__ == "__main__":
    stage_main(run, DownloadPaths, __doc__)
