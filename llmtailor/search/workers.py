"""More worker processes on one study: ``--workers N`` runs this process and N-1 children.

Each child runs the same command line, told to be one quiet worker, and is an ordinary
worker (``search.study`` lets processes share a study without measuring a plan twice
or overshooting the total). A child is quiet: no progress bar, no report, its messages kept in a temporary file that
is shown only if it fails; the parent shows the progress, waits for the children and
writes the report. Children run in their own session, so a Ctrl-C at the terminal
reaches the parent alone, which passes one interrupt on to each child (a child then
records its running trial as interrupted, as a Ctrl-C does) and waits for them; those
still running STOP_WAIT_S later are killed (their trials are failed by heartbeat).
The CPU cores are shared out: each process gets cores // N torch threads unless
OMP_NUM_THREADS says otherwise. A parent killed outright (SIGKILL) leaves its children
running; they stop by themselves when the study reaches its total.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

STOP_WAIT_S = 60
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """workers - 1 child processes running the llmtailor command line `child_argv`, for the length of a with block."""

    def __init__(self, child_argv: list[str], workers: int, log: Any) -> None:
        self.argv, self.count, self.log = child_argv, workers - 1, log
        self.children: list[tuple[subprocess.Popen, IO[bytes]]] = []
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.threads_before: int | None = None  # this process's torch threads, given back at the end

    def __enter__(self) -> Workers:
        if self.count < 1:
            return self
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
        if "OMP_NUM_THREADS" not in os.environ:
            import torch

            self.threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            env["OMP_NUM_THREADS"] = str(self.threads)
        command = [sys.executable, "-m", "llmtailor.cli", *self.argv]
        for _ in range(self.count):
            output = tempfile.TemporaryFile()
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            self.children.append((process, output))
        pids = ", ".join(str(p.pid) for p, _ in self.children)
        self.log(f"started {self.count} more worker process{'es' if self.count > 1 else ''} (pid {pids})")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is not None:
                self.stop()
        finally:
            for process, output in self.children:
                if process.poll() is None:
                    process.kill()  # only after a second Ctrl-C while stopping
                    process.wait()
                output.close()
            if self.threads_before is not None:
                import torch

                torch.set_num_threads(self.threads_before)

    def wait(self) -> list[str]:
        """Wait for every child to finish; what went wrong with each that failed, one line each."""
        failures = []
        for number, (process, output) in enumerate(self.children, start=2):
            code = process.wait()
            if code != 0:
                failures.append(f"worker {number} (pid {process.pid}) failed with exit code {code}: "
                                f"{_last_line(output)}")
        return failures

    def stop(self) -> None:
        """Ask every child still running to stop, as Ctrl-C would (SIGTERM: a child started with SIGINT ignored, as
        from a script's background, still stops); kill those not done STOP_WAIT_S later."""
        running = [p for p, _ in self.children if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _last_line(output: IO[bytes]) -> str:
    output.seek(0)
    lines = [line.strip() for line in output.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
