"""The data half of the pipeline: registry, download, preprocess (crop/normalize), split, augment, array format."""
