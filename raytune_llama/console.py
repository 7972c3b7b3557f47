"""What a run prints: our own lines ("[raytune_llama] ..."), the per-step progress line, the
summary and warnings a user can act on. Ray's, Ray Data's and DeepSpeed's internals go to log
files instead; `--verbose` (finetune, sweep, tune-layout) prints everything as before.

Where the hidden lines go:

* the driver's Python loggers of Ray (ray.*, Ray Data, Ray Train, Ray Tune) and DeepSpeed:
  RUN_DIR/logs/driver.log (`setup`, called by the CLI once the run's directory is known);
* every Ray process (training workers, Ray Train's controller, Ray Data tasks): Ray's session
  logs, `<temp dir>/session_*/logs` (a local cluster: /tmp/raytune_llama/session_latest/logs;
  each training worker's log records, our per-rank engine lines included:
  logs/train/ray-train-app-worker-*.log). Errors and tracebacks of any process still reach the
  console.

Some of Ray's noise is removed at its cause instead (trainer/cluster.py, local clusters: the
dashboard for Ray Train's placement-group cleaner, no preemption watcher on one machine). A
cluster joined with --address keeps its preemption watcher, and with it one line of Ray Train's
controller per worker-group start ("... 'PreemptionWatcher' ... has constructor arguments in the
object store ..."): a worker process's own output is forwarded as is.

Nothing here imports Ray, torch or DeepSpeed at module level: every CLI command imports it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

VERBOSE_ENV = "RAYTUNE_LLAMA_VERBOSE"
"""'1': print everything (the CLI's --verbose; forwarded to the training workers)."""

DRIVER_LOG = "driver.log"

# Known-harmless warnings, hidden from the console in quiet mode (they stay in the log files).
# Each is something the user can neither act on nor needs to know; anything else at WARNING or
# above is printed.
HARMLESS_WARNINGS = (
    # ray.init: Ray 2.60 turns token authentication on by default for a new local cluster (and
    # when it finds a token) and announces it at every start; there is nothing to do about it.
    re.compile(r"^Token authentication is enabled for this Ray cluster\."),
    # Ray Data: the token store build turns Ray Data's progress bars off on purpose (the driver
    # prints its own data line: trainer/data_pipeline.py) and Ray Data says so, once per process.
    re.compile(r"^Progress bars disabled\. To enable"),
    # Workers, DeepSpeed ZeRO: DeepSpeed's own collectives call the deprecated
    # torch.distributed.all_gather_into_tensor, once per step and rank; DeepSpeed's to change.
    re.compile(r"FutureWarning: `torch\.distributed\.all_gather_into_tensor` is deprecated"),
)

# Driver: loggers of libraries whose INFO lines (Ray's start-up banner, Ray Data's execution
# plans, Ray Train's and Tune's bookkeeping) belong in the log file, not on the console.
LIBRARY_LOGGERS = ("ray", "DeepSpeed", "deepspeed")
# ... of which these bring console handlers of their own (propagate=False) at import time.
SELF_HANDLED_LOGGERS = ("ray.data", "DeepSpeed")

# Workers: Ray Train turns print() into INFO records of the root logger (its print patch).
# A print() from inside these packages is their internal chatter (DeepSpeed: "DeepSpeed
# deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", once per worker process).
PRINTING_LIBRARIES = ("deepspeed",)

_state: dict = {"file_handler": None, "ray_log_dir": None}


def add_verbose_flag(parser) -> None:
    """--verbose on a subcommand that runs on Ray (the shared flag of finetune, sweep, tune-layout)."""
    parser.add_argument(
        "--verbose", action="store_true",
        help="print Ray's, Ray Data's and DeepSpeed's own log lines and every worker's per-rank details on the "
             "console as well (by default they go to RUN_DIR/logs/driver.log and Ray's session logs)")


def is_verbose() -> bool:
    """--verbose given (in a worker: forwarded by the driver through worker_env)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_env() -> dict:
    """Environment variables for the training workers' runtime_env: the driver's --verbose.
    (A local cluster's processes inherit the driver's environment anyway; a remote one's do not.)"""
    return {VERBOSE_ENV: "1"} if is_verbose() else {}


def is_harmless(record: logging.LogRecord) -> bool:
    """A record that HARMLESS_WARNINGS hides from the console."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed record is printed (and fails) as logging always did
        return False
    return any(p.search(message) for p in HARMLESS_WARNINGS)


def _is_library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS)


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (StreamHandler; files are FileHandlers or Ray's
    SessionFileHandler, a plain Handler)."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class DriverConsoleFilter(logging.Filter):
    """The driver's console in quiet mode: library records below WARNING and known-harmless
    warnings are left to the log file; everything else (ours at --log-level, any library's
    warnings and errors) is printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_library(record.name) and record.levelno < logging.WARNING:
            return False
        return not is_harmless(record)


class WorkerConsoleFilter(logging.Filter):
    """A training worker's console in quiet mode (Ray forwards it to the driver's terminal):
    our per-rank INFO lines (the driver prints the layout once), libraries' print() chatter and
    known-harmless warnings stay in Ray Train's worker log; the user's own prints, and every
    warning and error, are printed."""

    def __init__(self):
        super().__init__()
        self._library_dirs = tuple(_package_dirs(PRINTING_LIBRARIES))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            if record.name == "raytune_llama" or record.name.startswith("raytune_llama."):
                return False
            if record.name == "root" and self._library_dirs and \
                    os.path.abspath(record.pathname).startswith(self._library_dirs):
                return False
        return not is_harmless(record)


def _package_dirs(names) -> list[str]:
    """The install folders of these packages, found without importing them."""
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.abspath(location), ""))
    return dirs


def _add_filter_once(handler: logging.Handler, cls: type) -> None:
    if not any(isinstance(f, cls) for f in handler.filters):
        handler.addFilter(cls())


def setup(verbose: bool, log_dir: Optional[Path]) -> Optional[Path]:
    """The CLI's console policy for a command that runs on Ray, once its output folder is known.
    verbose: change nothing (everything is printed, as before). Quiet: the driver's library
    loggers also write to log_dir/driver.log and only their warnings (less the known-harmless
    ones) reach the console. Returns the log file (None when verbose)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"  # read by cluster.connect and worker_env
    if verbose:
        return None
    route_library_loggers()  # first: importing ray.data replaces the "ray.data" logger's handlers
    root = logging.getLogger()
    if not any(_is_console(h) for h in root.handlers):  # a caller that has not configured logging
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        if _is_console(h):
            _add_filter_once(h, DriverConsoleFilter)
    log_file = None
    if log_dir is not None:
        log_file = Path(log_dir) / DRIVER_LOG
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        old = _state["file_handler"]
        for name in ("",) + SELF_HANDLED_LOGGERS:
            logger = logging.getLogger(name)
            if old is not None:
                logger.removeHandler(old)
            logger.addHandler(handler)
        if old is not None:
            old.close()
        _state["file_handler"] = handler
    return log_file


def route_library_loggers() -> None:
    """Point Ray's and Ray Data's driver loggers at the quiet console and the log file. Importing
    ray gives the "ray" logger a stderr handler of its own (propagate off), and ray.init without
    configure_logging removes it, leaving Python's last-resort handler to print its warnings
    unformatted and unfiltered: in quiet mode its records go up to the root handlers (filtered
    console + driver.log) instead. Ray Data installs its own console handler at import: it gets
    the same filter."""
    import ray  # noqa: F401  (configures the "ray" logger)
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    for name in SELF_HANDLED_LOGGERS:
        _filter_console_of(name)


def quiet_ray_data() -> None:
    """Ray Data's own console handler, in whichever process drives a run (the CLI's driver, a
    Tune trial of `sweep`), gets the quiet filter (trainer/data_pipeline.py). Verbose: nothing."""
    if not is_verbose():
        _filter_console_of("ray.data")


def _filter_console_of(name: str) -> None:
    for h in logging.getLogger(name).handlers:
        if _is_console(h):
            _add_filter_once(h, DriverConsoleFilter)


def quiet_worker() -> None:
    """In a training worker (Ray Train has configured its logging by then): route warnings
    through logging (Ray Train's worker log gets every one) and filter the console. Verbose:
    nothing changes."""
    if is_verbose():
        return
    # warnings.warn -> the "py.warnings" logger -> the root logger's handlers: Ray Train's
    # worker log file (all of them) and the console (WorkerConsoleFilter).
    logging.captureWarnings(True)
    for h in logging.getLogger().handlers:
        if _is_console(h):
            _add_filter_once(h, WorkerConsoleFilter)


class _StdoutToLog(io.TextIOBase):
    """A stdout that turns each line written into an INFO record (the log files get it; the
    quiet console filters our INFO records out)."""

    def __init__(self):
        self._log = logging.getLogger("raytune_llama.library_stdout")

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._log.info("%s", line)
        return len(text)


@contextlib.contextmanager
def library_prints_to_log():
    """Around a library call that print()s its internals: in quiet mode its stdout becomes log
    records instead of terminal lines (in a Ray Train worker, whose print patch also makes each
    print() a root-logger record that WorkerConsoleFilter keeps off the console, this drops the
    copy print() writes to stdout itself). Verbose: nothing changes."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stdout(_StdoutToLog()):
        yield


def remember_ray_log_dir() -> None:
    """Note where this Ray session writes its process logs (while connected)."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API names the session's log folder
        _state["ray_log_dir"] = node.get_logs_dir_path() if node is not None else None
    except Exception:
        _state["ray_log_dir"] = None


def log_locations() -> list[str]:
    """Where the lines hidden from the console went (empty when verbose or not set up)."""
    if os.environ.get(VERBOSE_ENV) != "0":
        return []
    found = []
    if _state["file_handler"] is not None:
        found.append(f"{_state['file_handler'].baseFilename} (driver)")
    ray_dir = _state["ray_log_dir"]
    found.append(f"{ray_dir} (Ray's processes)" if ray_dir else "Ray's session logs (session_latest/logs under "
                                                                "Ray's temp dir)")
    return found


def logs_line() -> Optional[str]:
    """The run summary's line naming the log files (None when verbose)."""
    found = log_locations()
    return "  logs " + "; ".join(found) + " (--verbose prints them here)" if found else None


def point_to_logs(stream=None) -> None:
    """After a failure in quiet mode: where the details are (the error itself is printed)."""
    found = log_locations()
    if found:
        print("raytune-llama: more detail in " + "; ".join(found), file=stream or sys.stderr, flush=True)
