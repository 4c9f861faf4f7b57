"""The HTTP layer: FastAPI routes, error envelopes, and the converter from worker outputs to the wire."""
