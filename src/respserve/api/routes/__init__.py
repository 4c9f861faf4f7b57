"""One module per resource family; each holds thin route functions and nothing else."""
