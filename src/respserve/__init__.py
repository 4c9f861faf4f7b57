"""respserve: an OpenAI Responses API server for models you host yourself."""

__version__ = "0.1.0"
