"""Training of torch models: the recipe (config), batches and online augmentation, the generic loop and its
optimiser, device and data-parallel helpers, checkpoints, the deep stages' runner, and the classifiers' stage,
training and predictor."""
