"""Pydantic models that ARE the wire format of the Responses API (requests, resources, stream events)."""
