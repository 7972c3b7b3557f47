"""The quiet console (raytune_llama/console.py): the --verbose flag, which records reach the
terminal and which only the log file, the workers' filter, and the local cluster's settings
that remove Ray's noise at its cause. No Ray cluster is started here."""
import io
import logging
import os
import warnings

import numpy as np
import pytest

from raytune_llama import console
from raytune_llama.cli.main import build_parser


def _record(name: str, level: int, message: str, pathname: str = __file__) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


@pytest.fixture
def clean_logging(monkeypatch):
    """Restore the logging and environment state console.setup changes."""
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    names = ["", "ray", "ray.data", "DeepSpeed"]
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    saved_state = dict(console._state)
    yield
    handler = console._state.get("file_handler")
    if handler is not None:
        handler.close()
    for n, (handlers, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:] = handlers
        logger.propagate = propagate
    for h in logging.getLogger().handlers:
        h.filters[:] = [f for f in h.filters if not isinstance(f, console.DriverConsoleFilter)]
    console._state.clear()
    console._state.update(saved_state)


@pytest.mark.parametrize("command", [["finetune", "c.yaml"], ["sweep", "c.yaml"], ["tune-layout", "c.yaml"]])
def test_verbose_flag_on_ray_commands(command):
    parser = build_parser()
    assert parser.parse_args(command).verbose is False
    assert parser.parse_args(command + ["--verbose"]).verbose is True


def test_driver_filter_hides_library_info_and_known_harmless_warnings():
    f = console.DriverConsoleFilter()
    assert not f.filter(_record("ray._private.worker", logging.INFO, "Started a local Ray instance."))
    assert not f.filter(_record("ray.data._internal.progress", logging.WARNING,
                                "Progress bars disabled. To enable, set `ray.data.DataContext...`"))
    assert not f.filter(_record("ray._private.authentication.authentication_token_setup", logging.WARNING,
                                "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    # warnings a user can act on, errors, and our own lines are printed
    assert f.filter(_record("ray._private.services", logging.WARNING, "/dev/shm has only 1 GB available"))
    assert f.filter(_record("ray.train", logging.ERROR, "Training failed"))
    assert f.filter(_record("raytune_llama.trainer.progress", logging.INFO, "ours"))
    assert f.filter(_record("user_code", logging.INFO, "theirs"))


def test_worker_filter_keeps_user_prints_warnings_and_errors():
    f = console.WorkerConsoleFilter()
    ds_dir = console._package_dirs(["deepspeed"])
    assert not f.filter(_record("raytune_llama.engine.parallel.engine", logging.INFO, "engine: dp=2 ..."))
    if ds_dir:  # a print() inside DeepSpeed, turned into a root record by Ray Train's print patch
        assert not f.filter(_record("root", logging.INFO, "DeepSpeed ... built successfully",
                                    os.path.join(ds_dir[0], "comm", "torch.py")))
    assert not f.filter(_record("py.warnings", logging.WARNING,
                                "/x/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` "
                                "is deprecated. Please use `torch.distributed.all_gather_single` instead."))
    assert f.filter(_record("root", logging.INFO, "a user's print in their loop"))
    assert f.filter(_record("raytune_llama.trainer.step_guard", logging.WARNING, "rank 1 stalled"))
    assert f.filter(_record("py.warnings", logging.WARNING, "x.py:1: UserWarning: something to fix"))
    assert f.filter(_record("deepspeed", logging.ERROR, "real error"))


def test_quiet_setup_routes_library_records_to_the_driver_log(clean_logging, tmp_path, capsys):
    out = io.StringIO()
    root = logging.getLogger()
    console_handler = logging.StreamHandler(out)
    root.addHandler(console_handler)
    try:
        log_file = console.setup(False, tmp_path / "logs")
        assert log_file == tmp_path / "logs" / console.DRIVER_LOG
        assert os.environ[console.VERBOSE_ENV] == "0" and console.worker_env() == {}
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
        logging.getLogger("ray.train").error("Training failed due to worker errors")
        for h in logging.getLogger().handlers + logging.getLogger("ray.data").handlers:
            h.flush()
    finally:
        root.removeHandler(console_handler)
    printed = out.getvalue()
    assert "Training failed" in printed
    assert "Started a local Ray instance" not in printed and "Token authentication" not in printed
    assert "Progress bars disabled" not in capsys.readouterr().err  # Ray Data's own console handler
    logged = log_file.read_text()
    for line in ("Started a local Ray instance", "Token authentication", "Progress bars disabled", "Training failed"):
        assert line in logged
    assert logging.getLogger("ray").propagate is True
    line = console.logs_line()
    assert line is not None and str(log_file) in line and "--verbose" in line


def test_verbose_setup_changes_nothing(clean_logging, tmp_path):
    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate)
    assert console.setup(True, tmp_path / "logs") is None
    assert (list(ray_logger.handlers), ray_logger.propagate) == before
    assert not (tmp_path / "logs").exists()
    assert console.worker_env() == {console.VERBOSE_ENV: "1"}
    assert console.logs_line() is None


def test_quiet_worker_filters_the_console_and_captures_warnings(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        console.quiet_worker()
        logging.getLogger("raytune_llama.engine.parallel.engine").info("engine: per-rank detail")
        logging.getLogger("raytune_llama.trainer.step_guard").warning("rank 1 stalled")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning)
            warnings.warn("a warning a user can act on", UserWarning)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)
        for h in root.handlers:  # pytest's own capture handlers got the filter too
            h.filters[:] = [f for f in h.filters if not isinstance(f, console.WorkerConsoleFilter)]
    printed = out.getvalue()
    assert "rank 1 stalled" in printed and "a warning a user can act on" in printed
    assert "per-rank detail" not in printed and "all_gather_into_tensor" not in printed


def test_library_prints_go_to_the_log(monkeypatch, capsys, caplog):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="raytune_llama"):
        with console.library_prints_to_log():
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert capsys.readouterr().out == ""
    assert "built successfully" in caplog.text
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.library_prints_to_log():
        print("shown when verbose")
    assert "shown when verbose" in capsys.readouterr().out


def test_model_inputs_copy_read_only_rows(tmp_path):
    from raytune_llama.trainer.batches import model_inputs

    path = tmp_path / "rows.bin"
    np.arange(8, dtype=np.int64).tofile(path)
    rows = np.memmap(path, dtype=np.int64, mode="r", shape=(2, 4))  # a store's read-only map
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "The given NumPy array is not writable"
        inputs = model_inputs({"input_ids": rows, "labels": np.array(rows)})
    assert inputs["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


class _FakeRay:
    def __init__(self):
        self.kwargs = None

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", console.VERBOSE_ENV):
        monkeypatch.delenv(name, raising=False)  # and restored after the test
    return fake


def test_local_cluster_removes_noise_at_its_cause(fake_ray):
    from raytune_llama.trainer import cluster

    assert cluster.connect(None, 4) is True
    kw = fake_ray.kwargs
    # the placement-group cleaner's state API (dashboard), found without guessing the instance
    assert kw["include_dashboard"] is True and kw["configure_logging"] is False
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{kw['dashboard_port']}"
    # one machine: nothing to preempt, and no core_worker error per worker-group start
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_joining_a_cluster_keeps_its_banner_off_the_quiet_console(fake_ray, monkeypatch):
    from raytune_llama.trainer import cluster

    assert cluster.connect("10.0.0.1:6379", 4) is False
    assert fake_ray.kwargs["configure_logging"] is False
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # a real cluster's nodes can be preempted
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    cluster.connect("10.0.0.1:6379", 4)
    assert fake_ray.kwargs["configure_logging"] is True


def test_finetune_help_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    assert "--verbose" in capsys.readouterr().out
