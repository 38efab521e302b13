"""Secure aggregation: the SecAgg+ protocol on Flower's cryptographic primitives (no Message API here)."""
