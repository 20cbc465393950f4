"""The paged KV pool: token slots, each holding one token's K and V in every layer.

A request's KV is a list of slot ids; the radix tree maps token prefixes to slot ids, so a
cached prefix is shared by every request that matches it, with no copy. Slot 0 is a
zeroed padding slot that is never handed out (padded gathers read it harmlessly).
"""

from __future__ import annotations

import torch

from engine_backend.kernels import gather_kv_slots, scatter_kv_slots
from engine_backend.kernels.ops import Backend


class OutOfSlotsError(RuntimeError):
    """The pool has fewer free slots than asked for (the caller evicts or preempts)."""


class KVPool:
    def __init__(
        self,
        *,
        capacity: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kernel_backend: Backend = "torch",
    ) -> None:
        self.capacity = capacity
        self.layers = layers
        self.device = device
        self.kernel_backend = kernel_backend
        # One tensor `[layers, 2 (K, V), slots, kv_heads, head_dim]`: its `[layers * 2,
        # slots, width]` view lets a swap gather a request's rows of every layer at once.
        # `empty`, not `zeros`: untouched pages cost no memory until a slot is used.
        self.kv = torch.empty(
            (layers, 2, capacity + 1, kv_heads, head_dim), dtype=dtype, device=device
        )
        self.kv[:, :, 0].zero_()
        self._free: list[int] = list(range(capacity, 0, -1))  # pop() hands out low ids first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.capacity - len(self._free)

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfSlotsError(f"need {n} KV slots, {len(self._free)} free")
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv[layer, 0, slots] = k
        self.kv[layer, 1, slots] = v

    def _rows(self) -> torch.Tensor:
        return self.kv.view(self.layers * 2, self.capacity + 1, -1)

    def swap_out(self, slots: list[int]) -> torch.Tensor:
        """Copy these slots' KV (all layers) to host memory in one contiguous transfer."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        packed = gather_kv_slots(self._rows(), index, backend=self.kernel_backend)
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed)
            return host
        return packed

    def swap_in(self, slots: list[int], host: torch.Tensor) -> None:
        """Write KV saved by `swap_out` into (new) slots."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        scatter_kv_slots(self._rows(), index, host.to(self.device), backend=self.kernel_backend)
