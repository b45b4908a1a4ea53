"""Backbones, the paper's model and the frozen-feature cache."""
