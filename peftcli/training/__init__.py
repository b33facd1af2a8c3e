"""Training a recipe: `loop` (the training loop), `optim` (the optimizers), `distributed` and
`launch` (torchrun), `tracking` (experiment trackers) and `budget` (parameters and memory
before training)."""
