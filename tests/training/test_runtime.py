"""Thread configuration: fixed counts, the auto share of the cores among live workers, overrides, errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medpipe import runtime
from medpipe.errors import UserError


@pytest.fixture
def workers(tmp_path, monkeypatch) -> Path:
    """An empty registration folder for this test, no MEDPIPE_THREADS, and torch's threads restored after."""
    folder = tmp_path / "workers"
    monkeypatch.setenv(runtime.WORKERS_DIR_ENV, str(folder))
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    threads = torch.get_num_threads()
    yield folder
    runtime.unregister_worker()
    torch.set_num_threads(threads)


@pytest.fixture
def sleepers():
    """start(n): n live `sleep` processes, killed and reaped after the test."""
    started: list[subprocess.Popen] = []

    def start(n: int) -> list[int]:
        started.extend(subprocess.Popen(["sleep", "60"]) for _ in range(n))
        return [p.pid for p in started[-n:]]

    yield start
    for process in started:
        process.kill()
        process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()  # reaped: its pid names no process now
    return process.pid


def test_an_int_is_applied_to_torch(workers):
    assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
    assert runtime.live_workers() == [os.getpid()]  # registered, so that auto workers count it


@pytest.mark.parametrize("others", [0, 1, 3])
def test_auto_divides_the_cores_among_live_workers(workers, sleepers, others):
    for pid in sleepers(others):
        runtime.register_pid(pid)
    expected = max(1, runtime.usable_cores() // (others + 1))
    assert runtime.configure_threads("auto") == expected == torch.get_num_threads()
    assert len(runtime.live_workers()) == others + 1


def test_share_of_cores_is_floored_at_one():
    assert [runtime.share_of_cores(8, n) for n in (1, 2, 3, 8, 20)] == [8, 4, 2, 1, 1]


def test_dead_and_reused_pids_are_ignored_and_their_files_removed(workers, sleepers):
    dead = runtime.register_pid(dead_pid())
    (reused_pid,) = sleepers(1)
    reused = runtime.register_pid(reused_pid)
    if not runtime.start_token(reused_pid):
        pytest.skip("no /proc: start times unknown")
    reused.write_text("1")  # a worker that started at tick 1 died; `sleep` now has its pid
    (workers / "notes.txt").write_text("not a registration")
    assert runtime.configure_threads("auto") == runtime.usable_cores()  # this process alone
    assert not dead.exists() and not reused.exists() and (workers / "notes.txt").exists()


def test_registration_is_removed_at_exit_of_the_worker(workers):
    code = "from medpipe import runtime; print(runtime.register_worker())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert Path(done.stdout.strip()).parent == workers
    assert list(workers.iterdir()) == []  # no file and no temporary file left


def test_configured_threads_unregisters_when_the_block_ends(workers):
    with runtime.configured_threads(1) as threads:
        assert threads == 1 and (workers / f"{os.getpid()}.pid").exists()
    assert runtime.live_workers() == []


def test_env_overrides_the_param(workers, monkeypatch):
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    assert runtime.configure_threads("auto") == 1 == torch.get_num_threads()


@pytest.mark.parametrize("value", [0, -1, "many", True, 2.5, None])
def test_invalid_values_name_the_param(workers, value):
    message = rf"train\.threads must be 'auto' or a positive integer.*got {value!r}"
    with pytest.raises(runtime.ThreadsError, match=message):
        runtime.configure_threads(value)
    assert not workers.exists() or runtime.live_workers() == []  # nothing registered for a refused value


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_invalid_env_values_name_the_variable_and_the_param(workers, monkeypatch, value):
    monkeypatch.setenv(runtime.THREADS_ENV, value)
    with pytest.raises(UserError, match=r"MEDPIPE_THREADS \(which overrides train\.threads\) must be"):
        runtime.configure_threads("auto")


def test_unwritable_workers_folder_is_a_user_error(workers, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(runtime.WORKERS_DIR_ENV, str(blocker / "workers"))
    with pytest.raises(runtime.WorkersDirError, match="MEDPIPE_WORKERS_DIR"):
        runtime.configure_threads(1)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"),
                                                               (False, False, "fp32")])
def test_precision_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    """An AVX2 CPU emulates bf16 (a ResNet-18 step 11x slower than fp32): auto trains it in fp32; named precisions
    are kept whatever the hardware."""
    from medpipe.training.device import autocast, resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == expected
    assert resolve_precision(cpu, "bf16") == "bf16" and resolve_precision(cpu, "fp32") == "fp32"
    with autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
