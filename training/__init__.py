"""fusionserve training: datasets, the moving-digits task, the training loop and its CLI."""
