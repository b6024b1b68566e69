"""Training of torch models: config, the generic loop, batches, online augmentation, checkpoints, predictor."""
