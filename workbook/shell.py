"""Commands as a learner types them, run from a notebook: each shown with its `$`, with what it printed, and
everything a notebook started stopped again when it ends, even when a cell fails."""

from __future__ import annotations

import atexit
import shlex
import subprocess
import time


class Missing(RuntimeError):
    """What a notebook needs is not here; the message says what provides it."""


def require(ok: bool, missing: str, provide: str) -> None:
    """Stop the notebook at its first cell, saying what is missing and the command that provides it."""
    if not ok:
        raise Missing(f"{missing}: {provide}")


def sh(command: str, check: bool = True, timeout: float = 900, env: dict | None = None, show: bool = True):
    """Run `command` with bash and print it and its output, as a terminal would; with `show` off, print nothing and
    return what it printed on stdout instead. A failure raises with the command's last lines."""
    if show:
        print(f"$ {command}", flush=True)
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if show and (done.stdout or done.stderr):
        print((done.stdout + done.stderr).rstrip()[-3000:], flush=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{command}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return None if show else done.stdout


def succeeds(command: str, timeout: float = 60) -> bool:
    """Whether `command` exits 0 (shown to no one: a check, not a step)."""
    try:
        return (
            subprocess.run(["bash", "-c", command], capture_output=True, timeout=timeout, check=False).returncode == 0
        )
    except subprocess.TimeoutExpired:
        return False


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    """The first true value of `check()`, tried every `every` seconds for up to `timeout`. A check that raises
    Missing (require) ends the wait at once: what it waits for cannot come."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Missing:
            raise
        except Exception as error:  # a service still starting refuses, resets or says 503: try again
            value, last = None, error
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s" + (f" (last: {last})" if last else ""))
        time.sleep(every)


class Cleanup:
    """The commands that undo what a notebook started, run in reverse order by `run()`, or when the kernel exits
    (a failed cell included); each runs once."""

    def __init__(self):
        self._undo: list[str] = []
        atexit.register(self.run)

    def add(self, command: str) -> None:
        self._undo.append(command)

    def run(self) -> None:
        while self._undo:
            command = self._undo.pop()
            print(f"$ {command}", flush=True)
            subprocess.run(["bash", "-c", command], capture_output=True, timeout=300, check=False)


def quoted(path) -> str:
    return shlex.quote(str(path))
