"""Job priorities: the one list the request schemas, the command line and the queue use."""

from __future__ import annotations

from typing import Literal, get_args

Priority = Literal["high", "normal", "low"]
"""A job's or batch's ``priority``."""

PRIORITIES: tuple[Priority, ...] = get_args(Priority)
"""Every priority, the highest first."""
