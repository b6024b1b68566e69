"""Classical baselines: image features (HOG, histograms, texture, CNN embeddings) with kNN, SVM, random forest and soft voting."""
