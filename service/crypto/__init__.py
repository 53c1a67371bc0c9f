"""Cryptography boundary: the only package that imports ``cryptography``."""
