"""State that outlives a request: stored responses, their items and events, conversations.

Everything outside this package talks to `ResponseStore`; only `sqlite.py` knows the backend.
"""
