"""Grad-CAM maps and the explain_check stage (the pointing game)."""
