"""Data layer: readers, ingestion, conversion, validation."""
