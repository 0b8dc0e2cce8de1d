"""Torch-free token-id radix trie: values by exact id sequence, longest-prefix lookup in O(len(ids)) (the prefix
cache's index: model/engine/prefix_cache.py).

A node per *branch*, not per token: each edge holds the run of ids between two branch points as a packed
array('i') (4 bytes a token). A node per token (a dict + an object each, ~230 bytes a token) made the index of a
server full of small snapshots grow by tens of MiB a wave of requests that no tier accounted for (issue 20).
"""

from __future__ import annotations

from array import array
from typing import Any

TYPECODE = "i"  # token ids < 2**31


def _packed(ids) -> array:
    return ids if isinstance(ids, array) else array(TYPECODE, ids)


def _common(a: array, b: array, start: int) -> int:
    """Length of the common prefix of edge `a` and b[start:]."""
    n = min(len(a), len(b) - start)
    if a[:n] == b[start:start + n]:
        return n
    lo, hi = 0, n  # a[:lo] matches, a[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[start:start + mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    __slots__ = ("children", "edge", "snap")

    def __init__(self, edge: array) -> None:
        self.children: dict[int, _Node] = {}  # first id of the child's edge -> child
        self.edge = edge  # the ids from the parent to this node
        self.snap: Any = None


class TokenTrie:
    """Values (anything with an `ids` sequence) by token ids."""

    def __init__(self) -> None:
        self.root = _Node(array(TYPECODE))
        self.nodes = 0  # below the root
        self.edge_tokens = 0  # ids held in edges

    def _walk(self, ids: array):
        """(the path of (node, consumed) whose edges match ids fully, in order, root first)."""
        node, i, path = self.root, 0, [(self.root, 0)]
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None or len(child.edge) > len(ids) - i or child.edge != ids[i:i + len(child.edge)]:
                break
            node, i = child, i + len(child.edge)
            path.append((node, i))
        return path

    def get(self, ids) -> Any:
        ids = _packed(ids)
        node, i = self._walk(ids)[-1]
        return node.snap if i == len(ids) else None

    def longest(self, ids, max_len: int) -> Any:
        best = None
        for node, _ in self._walk(_packed(ids[:max_len])):
            if node.snap is not None:
                best = node.snap
        return best

    def put(self, snap: Any) -> None:
        ids = _packed(snap.ids)
        node, i = self._walk(ids)[-1]
        if i < len(ids):
            child = node.children.get(ids[i])
            if child is not None:  # the edge diverges (or the ids end) inside it: split it there
                k = _common(child.edge, ids, i)
                mid = _Node(child.edge[:k])
                child.edge = child.edge[k:]
                mid.children[child.edge[0]] = child
                node.children[ids[i]] = mid
                self.nodes += 1
                node, i = mid, i + k
            if i < len(ids):
                leaf = _Node(ids[i:])
                node.children[ids[i]] = leaf
                self.nodes += 1
                self.edge_tokens += len(ids) - i
                node = leaf
        node.snap = snap

    def remove(self, ids) -> None:
        ids = _packed(ids)
        path = self._walk(ids)
        node, i = path[-1]
        if i != len(ids) or node.snap is None:
            raise KeyError("no value under these ids")
        node.snap = None
        # prune: a node with no value keeps no leaf and no single-child chain (merged into its child)
        for depth in range(len(path) - 1, 0, -1):
            node, parent = path[depth][0], path[depth - 1][0]
            if node.snap is not None:
                break
            if not node.children:
                del parent.children[node.edge[0]]
                self.nodes -= 1
                self.edge_tokens -= len(node.edge)
                continue
            if len(node.children) == 1:
                (child,) = node.children.values()
                child.edge = node.edge + child.edge
                parent.children[node.edge[0]] = child
                self.nodes -= 1
            break
