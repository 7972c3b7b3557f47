"""Shared test set-up: repo paths and a persistent DeepSpeed/torch extension cache."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    session.config._raytune_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once everything is reported and
    every fixture (Ray heads, clusters) is torn down. Interpreter finalization after a session
    that ran Ray drivers, gloo groups and multi-node local clusters in-process has been seen to
    crash (SIGSEGV in native threads at exit, after every test passed), which would turn a green
    run red; nothing the tests check happens after this point."""
    import sys

    status = getattr(config, "_raytune_exitstatus", None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
