"""RFC 6962 / RFC 9162 Merkle hashing and proofs, against the published vectors and exhaustively."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.access_log import merkle
from service.access_log.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MemoryTree,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# The 8-leaf test tree used by Certificate Transparency implementations (RFC 6962 test data).
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
H = {
    "96a2": "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f08": "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47": "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    "bc1a": "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "ca85": "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "d37e": CT_ROOTS[3],
    "fac5": CT_ROOTS[1],
    "6e34": CT_ROOTS[0],
    "0ebc": "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
}
CT_INCLUSION = [
    (0, 1, []),
    (0, 8, ["96a2", "5f08", "6b47"]),
    (5, 8, ["bc1a", "ca85", "d37e"]),
    (2, 3, ["fac5"]),
    (1, 5, ["6e34", "5f08", "bc1a"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a2", "5f08", "6b47"]),
    (6, 8, ["0ebc", "ca85", "d37e"]),
    (2, 5, ["5f08", "bc1a"]),
]


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 §2.1, recursively (independent of the module's algorithm)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(
        b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])
    ).digest()


@pytest.fixture(scope="module")
def ct_tree() -> MemoryTree:
    return MemoryTree(leaf_hash(leaf) for leaf in CT_LEAVES)


def test_hashes_are_domain_separated() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    assert MemoryTree().root() == EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_the_published_vectors(ct_tree: MemoryTree, size: int) -> None:
    assert ct_tree.root(size).hex() == CT_ROOTS[size - 1]
    assert reference_root(CT_LEAVES[:size]).hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size", "expected"), CT_INCLUSION)
def test_inclusion_proofs_match_the_published_vectors(
    ct_tree: MemoryTree, index: int, size: int, expected: list[str]
) -> None:
    proof = merkle.inclusion_proof(index, size, ct_tree.lookup)
    assert [h.hex() for h in proof] == [H[e] for e in expected]
    verify_inclusion(
        leaf=leaf_hash(CT_LEAVES[index]),
        index=index,
        size=size,
        proof=proof,
        root=bytes.fromhex(CT_ROOTS[size - 1]),
    )


@pytest.mark.parametrize(("first", "second", "expected"), CT_CONSISTENCY)
def test_consistency_proofs_match_the_published_vectors(
    ct_tree: MemoryTree, first: int, second: int, expected: list[str]
) -> None:
    proof = merkle.consistency_proof(first, second, ct_tree.lookup)
    assert [h.hex() for h in proof] == [H[e] for e in expected]
    verify_consistency(
        first=first,
        second=second,
        first_root=bytes.fromhex(CT_ROOTS[first - 1]),
        second_root=bytes.fromhex(CT_ROOTS[second - 1]),
        proof=proof,
    )


leaf_lists = st.lists(st.binary(max_size=8), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(leaves=leaf_lists)
def test_root_of_any_size_matches_the_rfc_definition(leaves: list[bytes]) -> None:
    tree = MemoryTree(leaf_hash(leaf) for leaf in leaves)
    compact = CompactRange()
    for size, leaf in enumerate(leaves, start=1):
        compact.append(leaf_hash(leaf))
        assert tree.root(size) == compact.root() == reference_root(leaves[:size])


@settings(max_examples=40, deadline=None)
@given(leaves=leaf_lists)
def test_every_inclusion_proof_verifies(leaves: list[bytes]) -> None:
    tree = MemoryTree(leaf_hash(leaf) for leaf in leaves)
    for size in range(1, len(leaves) + 1):
        root = tree.root(size)
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, tree.lookup)
            verify_inclusion(
                leaf=leaf_hash(leaves[index]), index=index, size=size, proof=proof, root=root
            )


@settings(max_examples=40, deadline=None)
@given(leaves=leaf_lists)
def test_every_consistency_proof_verifies(leaves: list[bytes]) -> None:
    tree = MemoryTree(leaf_hash(leaf) for leaf in leaves)
    roots = [tree.root(size) for size in range(len(leaves) + 1)]
    for second in range(len(leaves) + 1):
        for first in range(second + 1):
            verify_consistency(
                first=first,
                second=second,
                first_root=roots[first],
                second_root=roots[second],
                proof=merkle.consistency_proof(first, second, tree.lookup),
            )


def _tamperings(items: list[bytes], position: int) -> list[list[bytes]]:
    """Change, add, remove and reorder around ``position``."""
    changed = [*items]
    changed[position] = bytes([changed[position][0] ^ 1]) + changed[position][1:]
    variants = [
        changed,
        [*items[:position], b"\x42" * 32, *items[position:]],
        [*items[:position], *items[position + 1 :]],
    ]
    if len(items) > 1:
        other = (position + 1) % len(items)
        swapped = [*items]
        swapped[position], swapped[other] = swapped[other], swapped[position]
        variants.append(swapped)
    return variants


@settings(max_examples=60, deadline=None)
@given(
    leaves=st.lists(st.binary(min_size=1, max_size=8), min_size=2, max_size=33, unique=True),
    data=st.data(),
)
def test_tampered_inclusion_proofs_fail(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MemoryTree(leaf_hash(leaf) for leaf in leaves)
    size = data.draw(st.integers(2, len(leaves)))
    index = data.draw(st.integers(0, size - 1))
    root = tree.root(size)
    proof = merkle.inclusion_proof(index, size, tree.lookup)
    for position in range(len(proof)):
        for bad in _tamperings(proof, position):
            with pytest.raises(ProofError):
                verify_inclusion(
                    leaf=leaf_hash(leaves[index]), index=index, size=size, proof=bad, root=root
                )
    with pytest.raises(ProofError):
        verify_inclusion(
            leaf=leaf_hash(leaves[index] + b"!"), index=index, size=size, proof=proof, root=root
        )
    with pytest.raises(ProofError):
        verify_inclusion(
            leaf=leaf_hash(leaves[index]),
            index=index,
            size=size,
            proof=proof,
            root=node_hash(root, root),
        )


@settings(max_examples=60, deadline=None)
@given(
    leaves=st.lists(st.binary(min_size=1, max_size=8), min_size=3, max_size=33, unique=True),
    data=st.data(),
)
def test_tampered_consistency_proofs_fail(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MemoryTree(leaf_hash(leaf) for leaf in leaves)
    second = data.draw(st.integers(2, len(leaves)))
    first = data.draw(st.integers(1, second - 1))
    first_root, second_root = tree.root(first), tree.root(second)
    proof = merkle.consistency_proof(first, second, tree.lookup)
    for position in range(len(proof)):
        for bad in _tamperings(proof, position):
            with pytest.raises(ProofError):
                verify_consistency(
                    first=first,
                    second=second,
                    first_root=first_root,
                    second_root=second_root,
                    proof=bad,
                )
    # A tree that rewrote any earlier leaf is not consistent with the old root.
    rewritten = [*leaves[:second]]
    victim = data.draw(st.integers(0, first - 1))
    rewritten[victim] = rewritten[victim] + b"!"
    forked = MemoryTree(leaf_hash(leaf) for leaf in rewritten)
    with pytest.raises(ProofError):
        verify_consistency(
            first=first,
            second=second,
            first_root=first_root,
            second_root=forked.root(second),
            proof=merkle.consistency_proof(first, second, forked.lookup),
        )


def test_out_of_range_requests_are_refused(ct_tree: MemoryTree) -> None:
    with pytest.raises(ValueError, match="outside"):
        merkle.inclusion_proof(8, 8, ct_tree.lookup)
    with pytest.raises(ValueError, match="no consistency proof"):
        merkle.consistency_proof(5, 4, ct_tree.lookup)
    with pytest.raises(ProofError):
        verify_inclusion(leaf=leaf_hash(b""), index=3, size=3, proof=[], root=ct_tree.root(3))
    with pytest.raises(ProofError):
        verify_consistency(
            first=4, second=3, first_root=EMPTY_ROOT, second_root=EMPTY_ROOT, proof=[]
        )


def test_subtrees_completed_by_an_append() -> None:
    # Appending leaf 7 completes subtrees (0,7), (1,3), (2,1), (3,0) — with 3 siblings read.
    assert merkle.siblings_to_complete(7) == [
        merkle.Subtree(0, 6),
        merkle.Subtree(1, 2),
        merkle.Subtree(2, 0),
    ]
    assert merkle.siblings_to_complete(8) == []
    assert merkle.range_subtrees(0, 13) == [
        merkle.Subtree(3, 0),
        merkle.Subtree(2, 2),
        merkle.Subtree(0, 12),
    ]


def test_peaks_are_the_right_frontier_of_a_tree() -> None:
    assert merkle.peaks(0) == []
    assert merkle.peaks(13) == [merkle.Subtree(3, 0), merkle.Subtree(2, 2), merkle.Subtree(0, 12)]
    assert merkle.peaks(8) == [merkle.Subtree(3, 0)]
    with pytest.raises(ValueError, match="peaks"):
        merkle.extend(3, [leaf_hash(b"a")], [leaf_hash(b"b")])


@settings(max_examples=200, deadline=None)
@given(size=st.integers(min_value=0, max_value=300), batch=st.integers(min_value=0, max_value=70))
def test_extending_in_one_batch_completes_the_subtrees_of_appending_one_by_one(
    size: int, batch: int
) -> None:
    leaves = [leaf_hash(str(n).encode()) for n in range(size + batch)]
    before = MemoryTree(leaves[:size])
    completed = merkle.extend(
        size, [before.levels[s.level][s.index] for s in merkle.peaks(size)], leaves[size:]
    )
    after = MemoryTree(leaves)
    expected = {
        merkle.Subtree(level, position): hash_
        for level, hashes in enumerate(after.levels)
        for position, hash_ in enumerate(hashes)
        if (position + 1) << level > size
    }
    assert dict(completed) == expected
    assert len(completed) == len(expected)
    known = {s: before.levels[s.level][s.index] for s in merkle.peaks(size)} | dict(completed)
    assert merkle.fold([known[s] for s in merkle.peaks(size + batch)]) == after.root()


def test_an_inclusion_proof_with_extra_or_missing_hashes_is_refused(ct_tree: MemoryTree) -> None:
    # RFC 9162 §2.1.3.2: a proof must be used up exactly when the path reaches the root.
    root = ct_tree.root(8)
    proof = merkle.inclusion_proof(5, 8, ct_tree.lookup)
    leaf = leaf_hash(CT_LEAVES[5])
    verify_inclusion(leaf=leaf, index=5, size=8, proof=proof, root=root)
    with pytest.raises(ProofError, match="too long"):
        verify_inclusion(leaf=leaf, index=5, size=8, proof=[*proof, b"\x42" * 32], root=root)
    # An interior node passed off as leaf 0 reaches the root one step early: too short.
    pair = node_hash(leaf_hash(CT_LEAVES[0]), leaf_hash(CT_LEAVES[1]))
    with pytest.raises(ProofError, match="too short"):
        verify_inclusion(
            leaf=pair, index=0, size=3, proof=[leaf_hash(CT_LEAVES[2])], root=ct_tree.root(3)
        )


def test_a_consistency_proof_with_extra_or_missing_hashes_is_refused(ct_tree: MemoryTree) -> None:
    first_root, second_root = ct_tree.root(6), ct_tree.root(8)
    proof = merkle.consistency_proof(6, 8, ct_tree.lookup)
    verify_consistency(
        first=6, second=8, first_root=first_root, second_root=second_root, proof=proof
    )
    with pytest.raises(ProofError, match="too long"):
        verify_consistency(
            first=6,
            second=8,
            first_root=first_root,
            second_root=second_root,
            proof=[*proof, b"\x42" * 32],
        )
    # Cut short, a proof from 2 to 3 leaves would say the third leaf changed nothing.
    two = ct_tree.root(2)
    with pytest.raises(ProofError, match="too short"):
        verify_consistency(first=2, second=3, first_root=two, second_root=two, proof=[])


def test_equal_or_empty_first_trees_need_matching_roots_and_no_proof(ct_tree: MemoryTree) -> None:
    root = ct_tree.root(5)
    verify_consistency(first=5, second=5, first_root=root, second_root=root, proof=[])
    verify_consistency(first=0, second=5, first_root=EMPTY_ROOT, second_root=root, proof=[])
    with pytest.raises(ProofError, match="different roots"):  # a fork at one size
        verify_consistency(
            first=5, second=5, first_root=root, second_root=ct_tree.root(4), proof=[]
        )
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(first=5, second=5, first_root=root, second_root=root, proof=[root])
    with pytest.raises(ProofError, match="empty tree is wrong"):
        verify_consistency(first=0, second=5, first_root=root, second_root=root, proof=[])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(first=0, second=5, first_root=EMPTY_ROOT, second_root=root, proof=[root])


def test_an_unaligned_range_is_not_decomposed() -> None:
    # [1, 3) has no complete aligned subtree of 2 leaves: silently returning one would hash
    # the wrong leaves into a root or proof.
    with pytest.raises(ValueError, match="not aligned"):
        merkle.range_subtrees(1, 3)
    assert merkle.range_subtrees(2, 4) == [merkle.Subtree(1, 1)]


def test_an_inclusion_proof_past_the_last_leaf_is_refused(ct_tree: MemoryTree) -> None:
    # Leaf 0 with an empty path is the root of size 1: it must not pass as a leaf 1 there.
    root = ct_tree.root(1)
    verify_inclusion(leaf=leaf_hash(CT_LEAVES[0]), index=0, size=1, proof=[], root=root)
    with pytest.raises(ProofError, match="outside"):
        verify_inclusion(leaf=leaf_hash(CT_LEAVES[0]), index=1, size=1, proof=[], root=root)
