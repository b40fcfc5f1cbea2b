"""Silence what compiled libraries print straight to the process's file descriptors (HiGHS, llama.cpp)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def c_output_silenced(descriptors: tuple[int, ...] = (2,)) -> Iterator[None]:
    """Point these descriptors (1: standard output, 2: standard error) at /dev/null for the block: a C library's
    lines do not pass through Python's sys.stdout/sys.stderr, so redirecting those would not reach them."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(fd) for fd in descriptors]
    except (OSError, ValueError):  # no real descriptors (an embedding application): nothing to silence
        yield
        return
    with open(os.devnull, "w") as devnull:
        for fd in descriptors:
            os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in zip(descriptors, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
