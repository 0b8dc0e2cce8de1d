"""Torch-free token-id trie: values by exact id sequence, longest-prefix lookup in O(len(ids)) dict steps
(the prefix cache's index: model/engine/prefix_cache.py)."""

from __future__ import annotations

from typing import Any


class _Node:
    __slots__ = ("children", "snap")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.snap: Any = None


class TokenTrie:
    """Values (anything with an `ids` tuple) by token ids."""

    def __init__(self) -> None:
        self.root = _Node()

    def get(self, ids: tuple[int, ...]) -> Any:
        node = self.root
        for t in ids:
            node = node.children.get(t)
            if node is None:
                return None
        return node.snap

    def longest(self, ids, max_len: int) -> Any:
        node, best = self.root, None
        for t in ids[:max_len]:
            node = node.children.get(t)
            if node is None:
                break
            if node.snap is not None:
                best = node.snap
        return best

    def put(self, snap: Any) -> None:
        node = self.root
        for t in snap.ids:
            node = node.children.setdefault(t, _Node())
        node.snap = snap

    def remove(self, ids: tuple[int, ...]) -> None:
        path, node = [], self.root
        for t in ids:
            path.append((node, t))
            node = node.children[t]
        node.snap = None
        for parent, t in reversed(path):  # prune the branch nobody else uses
            child = parent.children[t]
            if child.children or child.snap is not None:
                break
            del parent.children[t]
