"""The ring buffer a re-trace scores from: per row, the FFN inputs of the last R tokens in every layer and the
monitored attention outputs of the same tokens."""
from __future__ import annotations

import torch


class Ring:
    """Slots are shared by the rows of a batch (they advance together); `valid` marks padding per row.

    x: [layers, batch, R, hidden] in the model's dtype; a: [monitored, batch, R, hidden] float32."""

    def __init__(self, layers: int, monitored: int, batch: int, size: int, hidden: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.size = size
        self.x = torch.zeros(layers, batch, size, hidden, dtype=dtype, device=device)
        self.a = torch.zeros(monitored, batch, size, hidden, device=device)
        self.valid = torch.zeros(batch, size, dtype=torch.bool)
        self._ids = torch.arange(2 * size) % size
        self.next = 0
        self.written = 0
        self.slots = self._ids[:0]

    def begin(self, tokens: int, valid: torch.Tensor) -> None:
        """Slots for the last min(tokens, R) tokens of the coming forward ([batch, tokens] validity)."""
        take = min(tokens, self.size)
        self.slots = self._ids[self.next:self.next + take]
        self.valid[:, self.slots] = valid[:, tokens - take:]

    def write_x(self, layer: int, x: torch.Tensor) -> None:
        """x: [batch, tokens, hidden] FFN inputs of this forward."""
        take = self.slots.numel()
        last = x if x.shape[1] == take else x[:, -take:]
        last = last.detach() if last.requires_grad else last
        self.x[layer].index_copy_(1, self.slots.to(self.x.device), last.to(self.x.device, self.x.dtype))

    def write_all_x(self, xs: torch.Tensor) -> None:
        """xs: [layers, batch, tokens, hidden] FFN inputs of every layer (a decode loop that has them at once)."""
        take = self.slots.numel()
        self.x.index_copy_(2, self.slots.to(self.x.device), xs[:, :, -take:].to(self.x.dtype))

    def write_a(self, j: int, a: torch.Tensor) -> None:
        self.a[j].index_copy_(1, self.slots.to(self.a.device), a[:, -self.slots.numel():].float().to(self.a.device))

    def end(self) -> None:
        take = self.slots.numel()
        self.next = (self.next + take) % self.size
        self.written = min(self.size, self.written + take)

    def order(self, row: int) -> torch.Tensor:
        """Slot indices of row `row`'s buffered tokens, oldest first, padding left out."""
        if self.written < self.size:
            order = torch.arange(self.written)
        else:
            order = (self.next + torch.arange(self.size)) % self.size
        return order[self.valid[row, order]]
