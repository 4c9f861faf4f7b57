"""How many prompt tokens a step may prefill beside its decode tokens.

A step that prefills n prompt tokens costs about a decode step plus n times the cost of one prompt token,
and on a CPU one prompt token costs a sizeable fraction of a whole decode step (SmolLM2-135M on the
2-core CPU: ~4 ms a token against ~55 ms for a decode step of 8 streams). A fixed chunk large enough to
prefill quickly would stall every stream for seconds; so the budget is set from the costs measured in
recent steps, such that a step with prefill takes at most SLOWDOWN times a decode-only step. Long prompts
then arrive more slowly while others decode (the price of the streams' steady pace); with nobody
decoding they are prefilled in large chunks.
"""

from __future__ import annotations

SLOWDOWN = 2.5  # a step with prefill, over a decode-only step
IDLE_PREFILL_TOKENS = 2048  # per step, when no sequence is decoding
_MIN_TOKENS = 16  # a prompt always moves on, however slow its tokens
_SMOOTHING = 0.2  # weight of the newest measurement in the running averages


class PrefillBudget:
    def __init__(self, max_tokens: int, idle_tokens: int = IDLE_PREFILL_TOKENS) -> None:
        self.max_tokens = max_tokens
        self.idle_tokens = max(max_tokens, idle_tokens)
        self.decode_step_s: float | None = None  # a decode-only step
        self.token_s: float | None = None  # one prompt token, on top of a step's decode work

    def tokens(self, decoding: bool) -> int:
        """Prompt tokens the next step may prefill; `decoding`: whether some sequence decodes in it."""
        if not decoding:
            return self.idle_tokens
        if self.decode_step_s is None or self.token_s is None:
            return min(self.max_tokens, 4 * _MIN_TOKENS)  # until both costs are known
        fits = int((SLOWDOWN - 1) * self.decode_step_s / self.token_s)
        return max(_MIN_TOKENS, min(self.max_tokens, fits))

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        """Records a step that ran `decode_rows` decode tokens and `prefill_tokens` prompt tokens."""
        if decode_rows and not prefill_tokens:
            self.decode_step_s = _average(self.decode_step_s, seconds)
        elif prefill_tokens:
            base = self.decode_step_s if decode_rows and self.decode_step_s is not None else 0.0
            self.token_s = _average(self.token_s, max(seconds - base, 0.0) / prefill_tokens)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - _SMOOTHING) * current + _SMOOTHING * sample
