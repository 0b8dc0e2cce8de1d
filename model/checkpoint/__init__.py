"""Checkpoints: loading, signatures, the demo model."""
