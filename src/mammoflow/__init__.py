"""MammoFlow."""
