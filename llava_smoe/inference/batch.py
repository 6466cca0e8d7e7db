"""The rows the engine decodes together and their KV cache.

One transformers `DynamicCache` holds every running row, left-padded so that all rows write
their next token into the same column; the attention mask hides the padding and each row keeps
its own positions. A request prefilled on its own joins by padding (its cache on the left, or the
running rows' when it is longer) and concatenating along the batch; finished rows are dropped
with `batch_select_indices`, and columns that have become padding in every row are cut off.

Why not paged: paging pays when memory is scarce and rows are long (a GPU serving thousands of
tokens per request). Here the cost of a join is one copy of the cache, paid once per request,
and the padding costs attention over a few extra columns; both are small next to the model's
own work at these sizes, and the standard cache keeps transformers' attention paths (SDPA,
flash-attention, eager) unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Pad `x` with zeros at the start of dimension `dim` (counted from the end) up to `length`."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(x, pad)


class RunningBatch:
    """Rows decoding together: `cache`, `mask_RL` (1 = a real token), `lengths_R` (tokens per row,
    which is also the position of each row's next token)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask_RL: torch.Tensor | None = None
        self.lengths_R: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.lengths_R is None else int(self.lengths_R.shape[0])

    @property
    def width(self) -> int:
        return 0 if self.mask_RL is None else int(self.mask_RL.shape[1])

    def join(self, cache: DynamicCache, mask_RL: torch.Tensor) -> None:
        """Append the rows of a prefilled batch (left-padded, `mask_RL` its attention mask)."""
        lengths_R = mask_RL.sum(1)
        if self.cache is None:
            self.cache, self.mask_RL, self.lengths_R = cache, mask_RL, lengths_R
            return
        L = max(self.width, int(mask_RL.shape[1]))
        layers = []
        for (k_old, v_old, *_), (k_new, v_new, *_) in zip(self.cache, cache):
            layers.append((torch.cat([_left_pad(k_old, L, -2), _left_pad(k_new, L, -2)]),
                           torch.cat([_left_pad(v_old, L, -2), _left_pad(v_new, L, -2)])))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask_RL = torch.cat([_left_pad(self.mask_RL, L, -1), _left_pad(mask_RL, L, -1)])
        self.lengths_R = torch.cat([self.lengths_R, lengths_R])

    def keep(self, rows_R: torch.Tensor) -> None:
        """Keep only `rows_R` (indices, in the new order); cut columns that are padding everywhere."""
        if rows_R.numel() == 0:
            self.cache = self.mask_RL = self.lengths_R = None
            return
        self.cache.batch_select_indices(rows_R)
        self.mask_RL = self.mask_RL.index_select(0, rows_R)
        self.lengths_R = self.lengths_R.index_select(0, rows_R)
        unused = self.width - int(self.lengths_R.max())
        if unused > 0:
            self.cache = DynamicCache(ddp_cache_data=[(k[:, :, unused:], v[:, :, unused:])
                                                      for k, v, *_ in self.cache])
            self.mask_RL = self.mask_RL[:, unused:]

    def step_inputs(self) -> dict[str, torch.Tensor]:
        """Attention mask and positions for one new token per row (the token ids come from the caller)."""
        mask_RL = torch.cat([self.mask_RL, self.mask_RL.new_ones(len(self), 1)], dim=1)
        return {"attention_mask": mask_RL, "position_ids": self.lengths_R[:, None]}

    def advance(self) -> None:
        """After a decoding step: every row holds one more token."""
        self.mask_RL = torch.cat([self.mask_RL, self.mask_RL.new_ones(len(self), 1)], dim=1)
        self.lengths_R = self.lengths_R + 1
