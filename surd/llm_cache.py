"""A key/value cache for batched decoding that writes each new token in place instead of copying the whole cache.

transformers' `DynamicLayer` concatenates every step (`torch.cat([keys, new])`), so each decode step copies every
row's full key/value store; with a long shared prompt head at batch 16 that copy costs more than the model itself
on a CPU. `PreallocatedLayer` keeps a buffer with room for the whole generation and hands attention a view of its
filled part: the same values, shapes and per-head memory layout as the concatenated tensors, so the outputs are the
same, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views into a buffer of `capacity` positions, grown by doubling."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.device = keys.device
        self._key_buffer = keys.new_empty((*keys.shape[:2], max(capacity, keys.shape[-2]), keys.shape[-1]))
        self._value_buffer = values.new_empty((*values.shape[:2], self._key_buffer.shape[-2], values.shape[-1]))
        length = keys.shape[-2]
        self._key_buffer[:, :, :length].copy_(keys)  # also materialises expanded (broadcast) prefix views
        self._value_buffer[:, :, :length].copy_(values)
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]
        self.is_initialized = True

    def _owns_views(self) -> bool:
        # crop / batch_select_indices / reorder_cache reassign keys and values; then the buffer is stale
        return (self.keys.data_ptr() == self._key_buffer.data_ptr() and self.values.data_ptr()
                == self._value_buffer.data_ptr() and self.keys.shape[:2] == self._key_buffer.shape[:2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # after reset(): start over like a plain DynamicLayer
            return super().update(key_states, value_states)
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._owns_views() or length + new > self._key_buffer.shape[-2]:
            self.__init__(self.keys, self.values, 2 * (length + new))  # type: ignore[misc]  # re-buffer, rarely
        self._key_buffer[:, :, length : length + new].copy_(key_states)
        self._value_buffer[:, :, length : length + new].copy_(value_states)
        self.keys = self._key_buffer[:, :, : length + new]
        self.values = self._value_buffer[:, :, : length + new]
        return self.keys, self.values


def preallocated_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int, capacity: int,
                       config: Any) -> DynamicCache:
    """A cache holding `layers` (per-layer keys/values of one row, or `rows` rows) for `rows` rows, with room for
    `capacity` positions in all before it has to grow."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), capacity)
                    for k, v in layers]
    return cache
