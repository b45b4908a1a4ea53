"""Scoring files (predict) and serving the champion over HTTP (serve)."""
