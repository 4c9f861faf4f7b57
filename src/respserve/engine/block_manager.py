"""Which KV blocks each sequence owns, and which finished blocks are kept for reuse by later requests.

The pool (kv_cache.py) is `num_blocks` blocks of `block_size` token slots. A sequence owns a block table:
its i-th entry holds the KV of tokens [i * block_size, (i + 1) * block_size). Once a block is full its
contents depend only on its tokens and everything before them, so it is published under a hash of both
(the previous block's hash and its own tokens). A later sequence whose tokens start the same way shares
those blocks instead of computing them: a `previous_response_id` chain, a conversation, or a client that
resends the same long instructions every turn. A prompt with images also mixes a hash of its pixels
(`hash_salt`) into the hash of the block holding its first image token: images of one size expand to the
same placeholder tokens, and two different pictures must not share KV. A published block that no sequence
holds any more stays cached until its slot is needed, the least recently released first.

Gemma 3's image tokens attend both ways, so the KV of an image's first tokens depends on its later ones. A
hit may still end inside an image: a block is published only once `num_computed` passed it, and a chunk
never ends inside such an image (scheduler.py), so every published block holding part of one was computed
with the whole image; and its hash holds the pixels' salt and all tokens before it, so a sequence that hits
it has the same picture there, hence the same placeholders and features after the block too. The chunk that
follows the hit computes the rest of the image, reading the cached part as earlier keys.

Block 0 is never handed out: it stays zeros, and attention pads its reads with it, so padding never feeds
NaN from uninitialised memory into a masked product.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol

NULL_BLOCK = 0
_ROOT_HASH = -1


class BlockOwner(Protocol):
    """What the manager reads and writes on a sequence."""

    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[int]  # the hash of each published (full, computed) block, in table order
    num_computed: int  # tokens whose KV is in the pool
    hash_salt: tuple[int, int] | None  # (the first image token's position, a hash of the images), or None


@dataclass
class _Block:
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(1, num_blocks))  # never published, or evicted; taken from the left
        self._by_hash: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # published, unheld: evictable, oldest first

    @property
    def num_available(self) -> int:
        """Blocks a new sequence could take: free ones, and cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free) - len(self._idle)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: BlockOwner) -> bool:
        """Gives `seq` blocks for all its tokens, reusing the longest cached prefix; False (and nothing
        taken) when the pool cannot hold it now. The last token is always left to compute, since its
        logits are what the sequence needs next."""
        hits = self._cached_prefix(seq)
        fresh = self.blocks_for(len(seq.token_ids)) - len(hits)
        reclaimed_idle = sum(1 for block_id, _ in hits if block_id in self._idle)
        if fresh > self.num_available - reclaimed_idle:
            return False
        for block_id, block_hash in hits:
            self._hold(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(block_hash)
        for _ in range(fresh):
            seq.block_table.append(self._take())
        seq.num_computed = len(hits) * self.block_size
        return True

    def grow(self, seq: BlockOwner, num_tokens: int) -> bool:
        """Makes room for `num_tokens` tokens in `seq`'s table; False when the pool is out of blocks."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > self.num_available:
            return False
        for _ in range(missing):
            seq.block_table.append(self._take())
        return True

    def free(self, seq: BlockOwner) -> None:
        """Releases `seq`'s blocks, its last ones first so that they are also the first evicted."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    # Reused next, before blocks never used yet: the pool's untouched pages stay untouched
                    # (out of the resident set) until the blocks in use and cached really need them.
                    self._free.appendleft(block_id)
                else:
                    self._idle[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed = 0

    def publish(self, seq: BlockOwner) -> None:
        """Publishes the blocks of `seq` that became full and computed since the last call."""
        size = self.block_size
        while (len(seq.block_hashes) + 1) * size <= seq.num_computed:
            index = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[index * size : (index + 1) * size])
            parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT_HASH
            block_hash = self._hash(parent, tokens, index, seq.hash_salt)
            block_id = seq.block_table[index]
            block = self._blocks[block_id]
            # Two sequences can compute the same block in one step; the first one published wins.
            if block_hash not in self._by_hash and block.hash is None:
                block.hash, block.token_ids = block_hash, tokens
                self._by_hash[block_hash] = block_id
            seq.block_hashes.append(block_hash)

    def slot(self, seq: BlockOwner, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _hash(self, parent: int, tokens: tuple[int, ...], index: int, salt: tuple[int, int] | None) -> int:
        if salt is not None and index == salt[0] // self.block_size:  # later blocks inherit it through `parent`
            parent = hash((parent, salt[1]))
        return hash((parent, tokens))

    def _cached_prefix(self, seq: BlockOwner) -> list[tuple[int, int]]:
        """(block id, hash) of the cached blocks that `seq`'s tokens start with, all but its last token."""
        size, token_ids = self.block_size, seq.token_ids
        hits: list[tuple[int, int]] = []
        parent = _ROOT_HASH
        for index in range((len(token_ids) - 1) // size):
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            block_hash = self._hash(parent, tokens, index, seq.hash_salt)
            block_id = self._by_hash.get(block_hash)
            if block_id is None or self._blocks[block_id].token_ids != tokens:
                break
            hits.append((block_id, block_hash))
            parent = block_hash
        return hits

    def _hold(self, block_id: int) -> None:
        self._idle.pop(block_id, None)
        self._blocks[block_id].ref_count += 1

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._idle.popitem(last=False)
            block = self._blocks[block_id]
            del self._by_hash[block.hash]  # type: ignore[arg-type]
            block.hash, block.token_ids = None, ()
        self._blocks[block_id].ref_count = 1
        return block_id
