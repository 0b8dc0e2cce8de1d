"""Tensor side of the prefix cache (model/engine/prefix_cache.py): copies between the state pool and snapshots.

Device tier: (conv (mamba_layers, conv_dim, d_conv - 1), ssm (mamba_layers, heads, head_dim, d_state))
cloned out of the slot; KV stays in the pool's blocks (shared). Host tier: one flat uint8 buffer (pinned
on CUDA) holding ssm | conv | K rows | V rows of the n tokens, K/V as (attention_layers, n, kv_heads,
head_dim); the fp32 SSM part comes first so every part starts aligned to its element size. Disk tier
(model/runtime/disk_tier.py): that buffer's bytes, written by the tier's thread and read back into a host buffer.
"""

from __future__ import annotations

import torch

from model.runtime.state import StatePool


class SnapshotCopier:
    def __init__(self, pool: StatePool) -> None:
        self.pool = pool
        self.pin = pool.conv.device.type == "cuda"
        self._conv_bytes = pool.conv[:, 0].nbytes
        self._ssm_bytes = pool.ssm[:, 0].nbytes
        self.state_bytes = self._conv_bytes + self._ssm_bytes
        self.kv_block_bytes = 2 * pool.k[:, 0].nbytes
        self._kv_token_bytes = self.kv_block_bytes // pool.block_size
        self.layout = " ".join(f"{name}:{t.dtype}:{tuple(t[:, 0].shape)}" for name, t in
                               (("ssm", pool.ssm), ("conv", pool.conv), ("k", pool.k), ("v", pool.v)))

    def host_bytes(self, n_tokens: int) -> int:
        return self.state_bytes + n_tokens * self._kv_token_bytes

    def save(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.conv[:, slot].clone(), self.pool.ssm[:, slot].clone()

    def _rows(self, blocks: list[int], n: int) -> torch.Tensor:
        """Flat KV row of each of the first n positions of a block table (the pool viewed as
        (layers, blocks * block_size, kv_heads, head_dim))."""
        bs = self.pool.block_size
        b = torch.tensor(blocks[: -(-n // bs)], dtype=torch.long, device=self.pool.k.device)
        return (b[:, None] * bs + torch.arange(bs, device=b.device)).flatten()[:n]

    def _flat_kv(self):
        p = self.pool
        return p.k.flatten(1, 2), p.v.flatten(1, 2)

    def to_host(self, saved, blocks: list[int], n_tokens: int) -> torch.Tensor:
        conv, ssm = saved
        k, v = self._flat_kv()
        rows = self._rows(blocks, n_tokens)
        parts = [ssm, conv, k[:, rows], v[:, rows]]
        # One device buffer, then one device -> host copy (stream-ordered before any later write to the blocks).
        dev = torch.cat([t.contiguous().view(torch.uint8).flatten() for t in parts])
        out = torch.empty(dev.numel(), dtype=torch.uint8, pin_memory=self.pin)
        out.copy_(dev, non_blocking=self.pin)
        return out

    def _unpack(self, buf: torch.Tensor, n: int):
        p = self.pool
        a, conv_shape, ssm_shape = self._ssm_bytes, p.conv[:, 0].shape, p.ssm[:, 0].shape
        kv_shape = (p.k.shape[0], n, *p.k.shape[3:])
        kv_half = (self.host_bytes(n) - self.state_bytes) // 2
        ssm = buf[:a].view(p.ssm.dtype).view(ssm_shape)
        conv = buf[a:a + self._conv_bytes].view(p.conv.dtype).view(conv_shape)
        b = a + self._conv_bytes
        k = buf[b:b + kv_half].view(p.k.dtype).view(kv_shape)
        v = buf[b + kv_half:b + 2 * kv_half].view(p.v.dtype).view(kv_shape)
        return conv, ssm, k, v

    def restore_device(self, saved, slot: int, src: list[int], dst: list[int], n_tokens: int) -> None:
        """Slot state from the snapshot; the partial last block (if any) copied into the sequence's own
        block, which it will append to (the full blocks are shared through the block table)."""
        conv, ssm = saved
        p = self.pool
        p.conv[:, slot].copy_(conv)
        p.ssm[:, slot].copy_(ssm)
        last = n_tokens // p.block_size
        if n_tokens % p.block_size:
            p.k[:, dst[last]].copy_(p.k[:, src[last]])
            p.v[:, dst[last]].copy_(p.v[:, src[last]])

    def fork(self, src_slot: int, dst_slot: int, src: list[int], dst: list[int], n_tokens: int) -> None:
        """A fork (model/engine/forks.py): the slot's Mamba state copied into another live slot; the partial last
        block of the n tokens copied into dst's own block (the full ones are shared through the block table)."""
        self.restore_device((self.pool.conv[:, src_slot], self.pool.ssm[:, src_slot]), dst_slot, src, dst, n_tokens)

    def restore_host(self, packed: torch.Tensor, slot: int, dst: list[int], n_tokens: int) -> None:
        p = self.pool
        dev = packed.to(p.k.device, non_blocking=self.pin)  # the one host -> device transfer
        conv, ssm, k, v = self._unpack(dev, n_tokens)
        p.conv[:, slot].copy_(conv)
        p.ssm[:, slot].copy_(ssm)
        fk, fv = self._flat_kv()
        rows = self._rows(dst, n_tokens)
        fk[:, rows] = k
        fv[:, rows] = v

    def to_bytes(self, packed: torch.Tensor) -> memoryview:
        if packed.device.type == "cpu" and self.pin:
            torch.cuda.synchronize(self.pool.k.device)  # to_host's copy was queued, not done (off the loop here)
        return memoryview(packed.numpy()).cast("B")

    def from_bytes(self, data: memoryview, n_tokens: int) -> torch.Tensor:
        return torch.frombuffer(data, dtype=torch.uint8)
