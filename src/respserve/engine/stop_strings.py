"""Stop strings: cut the output at the first match, without streaming text that a match later removes."""

from __future__ import annotations


class StopStringMatcher:
    """Holds back the longest tail of the text that could still begin a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns the text that is safe to emit now; sets `stopped` when a stop string matched."""
        if not self._stops:
            return delta
        text = self._held + delta
        matches = [index for index in (text.find(stop) for stop in self._stops) if index >= 0]
        if matches:
            self.stopped = True
            self._held = ""
            return text[: min(matches)]
        keep = partial_match_length(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def partial_match_length(text: str, patterns: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is a proper beginning of one of `patterns`."""
    longest = 0
    for pattern in patterns:
        for size in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:size]):
                longest = size
                break
    return longest
