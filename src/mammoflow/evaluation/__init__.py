"""Metrics, calibration, the champion rule, subgroups, external validation, the audit."""
