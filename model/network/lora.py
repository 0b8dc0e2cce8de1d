"""Many LoRA adapters in one step: the per-row extra term (model/network/linear.py LinearExtra) of each targeted
projection, y[rows of adapter g] += (x A_g^T) B_g^T, batched per adapter group (a segmented shrink / expand, as
punica and S-LoRA do); no weights are merged and rows without an adapter come out bit for bit as without it.

Device memory: every targeted projection has two stacks with one entry per device adapter slot (MAX_LORAS),
padded to MAX_LORA_RANK with zeros (a smaller rank adds exact zeros): A (L, R, in) and B (L, out, R), B already
scaled (model/checkpoint/adapters.py folds alpha / r in). They are allocated once, before the KV pool is sized,
so their bytes come out of the same budget (lora_bytes is the formula).

The step's row -> adapter mapping (LoraStep) is set by whoever runs the step, before the forward:
  set_rows(list)   eager prefill / decode: per row the device adapter slot or -1; the groups (RowGroups) and a
                   (N,) index tensor
  use_index(buf)   static / CUDA-graph decode: a fixed (B,) buffer the graph reads (its contents refreshed by
                   device copies before each replay); always active, so a captured graph includes the term
The op itself is chosen by model/network/kernels.py (Kernels.lora): lora_reference here (segmented per group when
the step has groups, gathered per row from the index otherwise: graph-safe), lora_cpu (the reference with one
group; with several, every device slot's shrink in one GEMM, masked to each row's own adapter, then one expand:
three ops per projection whatever the groups, which is what counts at decode's few rows on a CPU), or the Triton
kernel on CUDA. B is stored (out, L x R) so that the expand over every slot is one GEMM (`LoraTerm.B` is the
(L, out, R) view).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.network.linear import RowGroups


class LoraStep:
    """The step's mapping, shared by every projection's term."""

    def __init__(self, device, slots: int = 0, rank: int = 0) -> None:
        self.device = torch.device(device)
        self.slots, self.rank = slots, rank
        self._mask: torch.Tensor | None = None  # (N, L x R): each row's own adapter's rank columns, see mask()
        self.groups: RowGroups | None = None
        self.index: torch.Tensor | None = None  # (N,) long: device adapter slot per row, -1 = none
        self.active = False  # some row has an adapter (or a fixed buffer is bound): the term runs
        self._rows: list[int] | None = None
        self._segments: tuple | None = None  # (starts, lens, adapters, max_len), see segments()
        self._fixed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows -> (arange, ones) for use_index

    def set_rows(self, rows: list[int]) -> None:
        """rows[i]: row i's device adapter slot, -1 for none."""
        self.groups = RowGroups.of([g if g >= 0 else None for g in rows], self.device)
        self.active = bool(self.groups.ids)
        self.index = torch.tensor(rows, dtype=torch.long, device=self.device) if self.active else None
        self._rows, self._segments, self._mask = rows, None, None

    def use_index(self, index: torch.Tensor) -> None:
        self.groups, self.index, self.active, self._rows, self._mask = None, index, True, None, None
        n = index.shape[0]
        if n not in self._fixed:
            self._fixed[n] = (torch.arange(n, dtype=torch.int32, device=index.device),
                              torch.ones(n, dtype=torch.int32, device=index.device))
        self._segments = (*self._fixed[n], index, 1)  # a segment per row: the index buffer is their adapters

    def clear(self) -> None:
        self.groups, self.index, self.active, self._rows, self._segments, self._mask = (None,) * 2 + (False,) + (None,) * 3

    def mask(self, dtype) -> torch.Tensor:
        """(N, L x R) of 0 / 1: row n keeps the R shrink columns of its own adapter slot (none: all 0); made once
        per step, from the index (device ops: graph-safe)."""
        if self._mask is None or self._mask.dtype != dtype:
            slots = torch.arange(self.slots, device=self.index.device)
            m = (self.index.unsqueeze(1) == slots).to(dtype)  # (N, L); -1 matches nothing
            self._mask = m.repeat_interleave(self.rank, dim=1)
        return self._mask

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(starts, lens, adapters, max_len): the runs of consecutive rows on one adapter (the Triton kernel's
        segments; a prefill chunk's tokens are one run), made once per step from set_rows' host list."""
        if self._segments is None:
            starts, lens, ads = [], [], []
            for i, g in enumerate(self._rows or ()):
                if g < 0:
                    continue
                if ads and ads[-1] == g and starts[-1] + lens[-1] == i:
                    lens[-1] += 1
                else:
                    starts.append(i)
                    lens.append(1)
                    ads.append(g)
            t = torch.tensor([starts, lens, ads], dtype=torch.int32).to(self.device, non_blocking=True)
            self._segments = (t[0], t[1], t[2], max(lens, default=0))
        return self._segments


def lora_segmented(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   groups: RowGroups) -> torch.Tensor:
    """Per adapter group g (a batched shrink then expand over the group's rows): y[rows] += (x[rows] A_g^T) B_g^T."""
    for g, rows in zip(groups.ids, groups.rows, strict=True):
        xs = x.index_select(0, rows)
        y = y.index_add(0, rows, (xs @ A[g].T) @ B[g].T)
    return y


def lora_gathered(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
    """Per row from a (N,) index (-1: none), fixed shapes (CUDA-graph safe): each row's A and B gathered, two bmm;
    rows without an adapter keep y exactly."""
    n = index.shape[0]
    x, y0 = x[:n], y[:n]
    has = index >= 0
    g = index.clamp(min=0)
    t = torch.bmm(A.index_select(0, g), x.unsqueeze(-1))  # (N, R, 1)
    d = torch.bmm(B.index_select(0, g), t).squeeze(-1)  # (N, out)
    out = torch.where(has.unsqueeze(-1), y0 + d.to(y.dtype), y0)
    return out if n == y.shape[0] else torch.cat([out, y[n:]])


def lora_all_slots(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, step: LoraStep) -> torch.Tensor:
    """Every slot's shrink in one GEMM, each row masked to its own adapter's columns, one expand GEMM added to y:
    three ops per projection. A row without an adapter adds exact zeros (y comes out unchanged)."""
    L, out, R = B.shape
    n = step.index.shape[0]
    t = (x[:n] @ A.reshape(L * R, -1).T) * step.mask(x.dtype)
    d = torch.addmm(y[:n], t, B.permute(1, 0, 2).reshape(out, L * R).T)
    return d if n == y.shape[0] else torch.cat([d, y[n:]])


def lora_cpu(x, y, A, B, step: LoraStep) -> torch.Tensor:
    """On a CPU: one adapter group -> its segmented shrink / expand; several (or a fixed buffer) -> lora_all_slots."""
    if step.groups is not None and len(step.groups.ids) == 1:
        return lora_segmented(x, y, A, B, step.groups)
    return lora_all_slots(x, y, A, B, step)


def lora_reference(x, y, A, B, step: LoraStep) -> torch.Tensor:
    if step.groups is not None:
        return lora_segmented(x, y, A, B, step.groups)
    return lora_gathered(x, y, A, B, step.index)


class LoraTerm:
    """One projection's LinearExtra: its stacks and the shared step."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, step: LoraStep, op: Callable) -> None:
        self.A, self.B, self.step, self.op = A, B, step, op

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.step.active:
            return y
        return self.op(x, y, self.A, self.B, self.step)


def lora_bytes(shapes: dict[str, tuple[int, int]], max_loras: int, max_rank: int, dtype: torch.dtype) -> int:
    """Device bytes of the stacks: MAX_LORAS x MAX_LORA_RANK x sum over targets of (in + out) x element size."""
    return max_loras * max_rank * sum(i + o for i, o in shapes.values()) * torch.empty(0, dtype=dtype).element_size()


def install(model, shapes: dict[str, tuple[int, int]], max_loras: int, max_rank: int, device, dtype,
            op: Callable) -> tuple[LoraStep, dict[str, LoraTerm]]:
    """Allocate the stacks (zeros) for every target projection of `model` and set each one's Linear.extra."""
    step = LoraStep(device, max_loras, max_rank)
    terms: dict[str, LoraTerm] = {}
    mods = dict(model.named_modules())
    for name, (n_in, n_out) in shapes.items():
        lin = mods[name]
        if (lin.in_features, lin.out_features) != (n_in, n_out):
            raise ValueError(f"{name}: ({lin.in_features}, {lin.out_features}) != ({n_in}, {n_out})")
        A = torch.zeros(max_loras, max_rank, n_in, device=device, dtype=dtype)
        B = torch.zeros(n_out, max_loras, max_rank, device=device, dtype=dtype).permute(1, 0, 2)  # see the module doc
        lin.extra = terms[name] = LoraTerm(A, B, step, op)
    return step, terms
