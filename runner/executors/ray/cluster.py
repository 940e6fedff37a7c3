"""Ray for one run: a local Ray started for it (and stopped after), or a cluster joined.

Ray's own ways stay Ray's: an address is what `ray.init(address=...)` takes ("auto" for the cluster
this machine belongs to, "HOST:6379" for a head's GCS), and a runtime env given to `ray job submit`
applies as usual. What this module adds: a local Ray started for the run listens on
loopback only (Ray's default on Linux is the machine's address, for a cluster this one is not), the
runner's own code is shipped to the actors when joining a cluster (so they run the driver's version
of it), Ray's start-up messages are kept off the progress display, and the run's signal handlers
survive `ray.init` (which installs its own SIGTERM handler in the driver).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

# Read by Ray when it is imported: a Ray started here binds 127.0.0.1 (as on macOS and Windows). Joining a
# cluster is unchanged: the driver then takes its address from the node it connects to.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402  (after the setting above)

from ...errors import RunnerError  # noqa: E402

RUNNER_PACKAGE = Path(__file__).resolve().parents[2]  # runner/
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


class RayUnavailable(RunnerError):
    """Ray could not be started or joined."""

    exit_code = 1


@contextmanager
def ray_session(address: str | None, runtime_env: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ray for the run. A Ray already initialised in this process (an application embedding the runner) is
    used as it is and left running."""
    if ray.is_initialized():
        yield
        return
    # Ray's usage statistics would be sent from a run on the user's behalf: off unless the user said otherwise.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    handlers = _signal_handlers()
    try:
        ray.init(address=address, include_dashboard=False if address is None else None,
                 runtime_env=_runtime_env(address, runtime_env), logging_level=logging.ERROR, log_to_driver=False,
                 namespace="dashscope-runner")
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: whatever ray.init raises
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayUnavailable(f"cannot start {where}: {exc}".splitlines()[0],
                             hint="check --ray-address ([run] ray_address): auto joins the cluster this machine is "
                                  "part of, HOST:6379 the one whose head that is; without it a local Ray is started"
                             ) from exc
    finally:
        _restore(handlers)
    try:
        yield
    finally:
        ray.shutdown()


def _runtime_env(address: str | None, given: Mapping[str, Any] | None) -> dict | None:
    """The run's runtime env: [run] ray_runtime_env when given (Ray merges it with a submitted job's own).
    Else, on a cluster joined by address, this runner's own package goes to the workers, so the actors run
    the driver's code (shipping it costs a few seconds a run; `ray_runtime_env = {}` skips it where the
    workers have the same runner installed). A driver started by `ray job submit` has its job's runtime env
    already (its working_dir holds the runner), and a local Ray's workers share the driver's files."""
    if given is not None:
        return json.loads(json.dumps(dict(given)))  # plain dicts and lists, as Ray takes them
    if address is None or os.environ.get(SUBMITTED_JOB_ENV):
        return None
    return {"py_modules": [str(RUNNER_PACKAGE)]}


def _signal_handlers() -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore(handlers: dict[int, object]) -> None:
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)
