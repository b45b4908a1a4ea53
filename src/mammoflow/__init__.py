"""MammoFlow."""

from mammoflow import quiet

quiet.install()
