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
        keep = self._partial_match_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
