"""The run's plumbing, none of it in the paper: one-line user errors, safe writes and locks, the row store, checkpoints,
the run folder, torchrun set-up, image conversion and grids, the local hub lookup."""
