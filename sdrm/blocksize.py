"""Feedback control of the attention block size from measured call time and memory."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockSizeController:
    """Halve or double the key/value block size B within [min_block, max_block].

    Each `update` takes one measured attention call: its time in milliseconds and the memory in use
    as a fraction of the budget (0..1). The controller halves B after `patience` consecutive calls
    above target (time > target_ms or memory > memory_target), and doubles it after `patience`
    consecutive calls below `low_water` of both targets. Calls between the two bands reset both
    counters, so a load that hovers near the target never flips B back and forth (hysteresis).
    max_block is normally the token count t: a block of t tokens is plain attention.
    """

    target_ms: float
    max_block: int
    block_size: int = 64
    min_block: int = 16
    memory_target: float = 0.8
    low_water: float = 0.5
    patience: int = 3
    history: list[int] = field(default_factory=list, repr=False)
    _over: int = field(default=0, repr=False)
    _under: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.target_ms <= 0:
            raise ValueError(f"target_ms must be > 0, got {self.target_ms}")
        if self.min_block < 1 or self.max_block < self.min_block:
            raise ValueError(f"need 1 <= min_block <= max_block, got {self.min_block} and {self.max_block}")
        if not 0 < self.low_water < 1:
            raise ValueError(f"low_water must be in (0, 1), got {self.low_water}")
        self.block_size = min(max(self.block_size, self.min_block), self.max_block)

    def update(self, elapsed_ms: float, memory_fraction: float = 0.0) -> int:
        """Record one call and return the block size to use next."""
        over = elapsed_ms > self.target_ms or memory_fraction > self.memory_target
        under = elapsed_ms < self.low_water * self.target_ms and memory_fraction < self.low_water * self.memory_target

        if over:
            self._over += 1
            self._under = 0
        elif under:
            self._under += 1
            self._over = 0
        else:
            self._over = 0
            self._under = 0

        if self._over >= self.patience and self.block_size > self.min_block:
            self.block_size = max(self.block_size // 2, self.min_block)
            self._over = 0
        elif self._under >= self.patience and self.block_size < self.max_block:
            self.block_size = min(self.block_size * 2, self.max_block)
            self._under = 0

        self.history.append(self.block_size)
        return self.block_size
