"""The KV of the prompt head that every chat shares (the template's start, with its default system prompt),
computed once at load time and copied into each prefill group whose prompts all start with it.

For SmolLM2 that head is most of a short prompt: 32 of the 41-46 tokens of the benchmark's prompts, so a
group's prefill runs on the rest only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from respserve.engine.kv_cache import new_cache

# A shorter shared head saves too little to be worth a copy per prefill.
_MIN_PREFIX_TOKENS = 8


class PrefixCache:
    def __init__(self, token_ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.token_ids = token_ids
        self._keys, self._values = keys, values

    def __len__(self) -> int:
        return len(self.token_ids)

    def covers(self, prompt: list[int]) -> bool:
        """Whether `prompt` starts with the prefix and goes on past it."""
        return len(prompt) > len(self.token_ids) and prompt[: len(self.token_ids)] == self.token_ids

    def copies(self, rows: int) -> DynamicCache:
        """A cache holding the prefix in each of `rows` rows, ready to take the rest of the prompts."""
        cache = new_cache(len(self._keys))
        for layer, keys, values in zip(cache.layers, self._keys, self._values, strict=True):
            layer.replace(keys.expand(rows, -1, -1, -1).clone(), values.expand(rows, -1, -1, -1).clone())
        return cache


def shared_chat_prefix(tokenizer: Any) -> list[int]:
    """The token ids two different chats begin with: what the template puts before the user's words."""
    if not tokenizer.chat_template:
        return []
    renders = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for text in ("Hello there.", "What time is it?")
    ]
    shared = 0
    for first, second in zip(*renders, strict=False):
        if first != second:
            break
        shared += 1
    return list(renders[0][:shared])


@torch.inference_mode()
def build_prefix_cache(model: Any, tokenizer: Any, device: torch.device) -> PrefixCache | None:
    token_ids = shared_chat_prefix(tokenizer)
    if len(token_ids) < _MIN_PREFIX_TOKENS:
        return None
    cache = new_cache(model.config.num_hidden_layers)
    model(input_ids=torch.tensor([token_ids], device=device), past_key_values=cache, use_cache=True)
    keys = [layer.keys.clone() for layer in cache.layers]
    values = [layer.values.clone() for layer in cache.layers]
    return PrefixCache(token_ids, keys, values)
