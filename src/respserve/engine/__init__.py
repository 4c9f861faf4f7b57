"""Generation: the pipeline worker that owns the model and the device, and what flows in and out of it."""
