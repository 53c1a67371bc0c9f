"""The verifiable access log: one append path, an RFC 6962 Merkle tree, signed checkpoints."""
