"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification (pure).

Invariants:
- leaves and interior nodes are domain-separated (0x00 and 0x01 prefixes), so a leaf can never be
  passed off as a node;
- every hash the tree needs is the hash of a *complete, aligned* subtree (``Subtree``) or a right
  fold of a few of them, so a store that keeps the complete subtrees answers any root or proof with
  O(log n) lookups;
- verification raises ``ProofError`` on any failure; it never returns ``False``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof, root or tree size does not check out."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


@dataclass(frozen=True, order=True)
class Subtree:
    """The complete subtree over leaves ``[index << level, (index + 1) << level)``."""

    level: int
    index: int

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_subtrees(start: int, end: int) -> list[Subtree]:
    """Decompose ``[start, end)`` into complete aligned subtrees, largest (leftmost) first.

    Valid for the ranges RFC 6962's recursion produces: ``start`` is a multiple of the largest
    power of two not above ``end - start``.
    """
    if not 0 <= start < end:
        raise ValueError(f"empty or negative range [{start}, {end})")
    subtrees = []
    position = start
    remaining = end - start
    for level in range(remaining.bit_length() - 1, -1, -1):
        if remaining >> level & 1:
            if position % (1 << level):
                raise ValueError(f"range [{start}, {end}) is not aligned")
            subtrees.append(Subtree(level, position >> level))
            position += 1 << level
    return subtrees


def fold(hashes: Sequence[bytes]) -> bytes:
    """The root of a range from its complete subtrees' hashes (largest first): a right fold."""
    if not hashes:
        return EMPTY_ROOT
    root = hashes[-1]
    for left in reversed(hashes[:-1]):
        root = node_hash(left, root)
    return root


def root_ranges(size: int) -> list[tuple[int, int]]:
    return [(0, size)] if size else []


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The ranges whose roots form the inclusion proof of leaf ``index`` (RFC 9162 §2.1.3.1),
    in proof order (from the leaf upwards)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start = start + k
    ranges.reverse()
    return ranges


def consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """The ranges whose roots form the consistency proof from ``first`` to ``second``
    (RFC 9162 §2.1.4.1), in proof order. Empty when ``first`` is 0 or equals ``second``."""
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    if first in (0, second):
        return []
    ranges: list[tuple[int, int]] = []
    start, end, m, whole = 0, second, first, True
    while m != end - start:
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        ranges.append((start, end))
    ranges.reverse()
    return ranges


def subtrees_for(ranges: Iterable[tuple[int, int]]) -> set[Subtree]:
    """Every complete subtree a set of ranges needs (fetch these in one batch)."""
    return {subtree for start, end in ranges for subtree in range_subtrees(start, end)}


def range_roots(ranges: Sequence[tuple[int, int]], hashes: Mapping[Subtree, bytes]) -> list[bytes]:
    return [fold([hashes[s] for s in range_subtrees(start, end)]) for start, end in ranges]


SubtreeLookup = Callable[[set[Subtree]], Mapping[Subtree, bytes]]


def tree_root(size: int, lookup: SubtreeLookup) -> bytes:
    ranges = root_ranges(size)
    return range_roots(ranges, lookup(subtrees_for(ranges)))[0] if ranges else EMPTY_ROOT


def inclusion_proof(index: int, size: int, lookup: SubtreeLookup) -> list[bytes]:
    ranges = inclusion_ranges(index, size)
    return range_roots(ranges, lookup(subtrees_for(ranges)))


def consistency_proof(first: int, second: int, lookup: SubtreeLookup) -> list[bytes]:
    ranges = consistency_ranges(first, second)
    return range_roots(ranges, lookup(subtrees_for(ranges)))


def verify_inclusion(
    *, leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2; ``leaf`` is the leaf *hash*. Raises ``ProofError``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, computed = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            computed = node_hash(sibling, computed)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            computed = node_hash(computed, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if computed != root:
        raise ProofError(f"leaf {index} is not included in the tree of size {size}")


def verify_consistency(
    *, first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2. Raises ``ProofError`` unless the tree of size ``second`` extends the
    tree of size ``first``."""
    if not 0 <= first <= second:
        raise ProofError(f"size {second} cannot extend size {first}")
    if first == second:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError(f"two different roots for size {first}")
        return
    if first == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        if first_root != EMPTY_ROOT:
            raise ProofError("the root of the empty tree is wrong")
        return
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    if not path:
        raise ProofError("consistency proof is empty")
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first_computed = second_computed = path[0]
    for hash_ in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            first_computed = node_hash(hash_, first_computed)
            second_computed = node_hash(hash_, second_computed)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            second_computed = node_hash(second_computed, hash_)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if first_computed != first_root:
        raise ProofError(f"the proof does not lead to the root of size {first}")
    if second_computed != second_root:
        raise ProofError(f"size {second} does not extend size {first}")


def new_subtrees(
    index: int, leaf: bytes, left_siblings: Mapping[Subtree, bytes]
) -> list[tuple[Subtree, bytes]]:
    """The complete subtrees that appending leaf ``index`` completes, with their hashes.

    ``left_siblings`` must hold ``siblings_to_complete(index)``.
    """
    completed = [(Subtree(0, index), leaf)]
    current = leaf
    for sibling in siblings_to_complete(index):
        current = node_hash(left_siblings[sibling], current)
        completed.append((Subtree(sibling.level + 1, sibling.index >> 1), current))
    return completed


def peaks(size: int) -> list[Subtree]:
    """The complete subtrees a tree of ``size`` leaves folds into for its root, largest first.

    They are everything needed to append to the tree (its right frontier): one per set bit of
    ``size``, at level ``l`` the subtree ``(size >> l) - 1``.
    """
    return range_subtrees(0, size) if size else []


def extend(
    size: int, peak_hashes: Sequence[bytes], leaves: Iterable[bytes]
) -> list[tuple[Subtree, bytes]]:
    """Every complete subtree that appending ``leaves`` to a tree of ``size`` completes, with its
    hash, in order of completion (the leaves themselves are the level-0 subtrees).

    ``peak_hashes`` are the hashes of ``peaks(size)``, largest first. Appending in one batch gives
    exactly the subtrees of appending the leaves one by one.
    """
    if len(peak_hashes) != size.bit_count():
        raise ValueError(f"a tree of size {size} has {size.bit_count()} peaks")
    stack = list(peak_hashes)
    completed: list[tuple[Subtree, bytes]] = []
    index = size
    for leaf in leaves:
        completed.append((Subtree(0, index), leaf))
        current, level, position = leaf, 0, index
        while position & 1:
            current = node_hash(stack.pop(), current)
            level += 1
            position >>= 1
            completed.append((Subtree(level, position), current))
        stack.append(current)
        index += 1
    return completed


def siblings_to_complete(index: int) -> list[Subtree]:
    """The left siblings that appending leaf ``index`` pairs with, lowest level first."""
    siblings = []
    level, position = 0, index
    while position & 1:
        siblings.append(Subtree(level, position - 1))
        level += 1
        position >>= 1
    return siblings


class CompactRange:
    """Root of a growing tree in O(log n) memory: the hashes of its complete "peaks".

    Used by offline verification to stream millions of entries.
    """

    __slots__ = ("_peaks", "size")

    def __init__(self) -> None:
        self._peaks: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        peaks = self._peaks
        position = self.size
        current = leaf
        while position & 1:
            current = node_hash(peaks.pop(), current)
            position >>= 1
        peaks.append(current)
        self.size += 1

    def root(self) -> bytes:
        return fold(self._peaks)


def root_of(leaves: Iterable[bytes]) -> bytes:
    """The root over leaf hashes (reference implementation by compact range)."""
    compact = CompactRange()
    for leaf in leaves:
        compact.append(leaf)
    return compact.root()


class MemoryTree:
    """Every complete subtree of a tree in memory (tests, benchmarks, offline tools)."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        index = self.size
        siblings = {s: self.levels[s.level][s.index] for s in siblings_to_complete(index)}
        for subtree, hash_ in new_subtrees(index, leaf, siblings):
            if subtree.level == len(self.levels):
                self.levels.append([])
            self.levels[subtree.level].append(hash_)

    def lookup(self, wanted: set[Subtree]) -> dict[Subtree, bytes]:
        return {s: self.levels[s.level][s.index] for s in wanted}

    def root(self, size: int | None = None) -> bytes:
        return tree_root(self.size if size is None else size, self.lookup)
