"""What an operator meets at run time, with the plugin as a process (issue 14): a second
instance given the same socket, and a kubelet socket that is a directory."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import trio

from tests.test_cli import GPU, HANG_GUARD, ROOT, start_cli, wait_exit
from trio_gpu_plugin._watch import identity
from trio_gpu_plugin.testing import FakeKubelet


class Stderr:
    """A process's stderr, read as it comes."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self.stream = process.stderr
        self.text = ""

    async def until(self, needle: str) -> None:
        with trio.fail_after(HANG_GUARD):
            while needle not in self.text:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"the process ended without saying {needle!r}:\n"
                                         f"{self.text}")
                self.text += chunk.decode(errors="replace")

    async def rest(self) -> str:
        """Everything, once the process has closed its stderr."""
        with trio.fail_after(HANG_GUARD):
            while chunk := await self.stream.receive_some(65536):
                self.text += chunk.decode(errors="replace")
        return self.text


async def test_a_second_instance_on_the_same_socket_leaves_the_first_alone_then_takes_over(
    fake_kubelet: FakeKubelet,
) -> None:
    path = fake_kubelet.socket_dir / "nvidia-gpu.sock"
    first = await start_cli(fake_kubelet, "--simulate", "pcie-4")
    second: trio.Process | None = None
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        served = identity(path)
        second = await start_cli(fake_kubelet, "--simulate", "pcie-4")
        stderr = Stderr(second)
        await stderr.until("served by another process")
        assert identity(path) == served  # the first's socket, never replaced
        # Only the first has registered: the second neither served nor registered.
        assert [r.accepted for r in fake_kubelet.registrations] == [True]
        line = next(line for line in stderr.text.splitlines()
                    if "served by another process" in line)
        assert " ERROR " in line and f"{path} is served by another process" in line
        assert "another instance of this plugin" in line and "NVIDIA's device plugin" in line
        assert "registered with the kubelet" not in stderr.text

        # A rolling update's old pod goes away: the second takes the socket over.
        first.send_signal(signal.SIGTERM)
        assert await wait_exit(first) == 0
        await fake_kubelet.wait_registered(GPU, count=2, timeout=HANG_GUARD)
        await stderr.until("registered with the kubelet")
        assert f"{path} is no longer served by another process" in stderr.text
        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second) == 0
        assert "Traceback" not in await stderr.rest()
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                await process.wait()
                if process.stderr is not None:
                    await process.stderr.aclose()


async def test_a_kubelet_socket_that_is_a_directory_is_one_error_line_and_exit_1(
    socket_dir: pathlib.Path,
) -> None:
    with trio.fail_after(HANG_GUARD):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_gpu_plugin", "--simulate", "pcie-4",
             "--kubelet-socket", str(socket_dir)],
            cwd=ROOT, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True,
            check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    [error] = [line for line in stderr.splitlines() if "error:" in line]
    assert error.startswith(f"trio-gpu-plugin: error: --kubelet-socket {socket_dir}: is a "
                            "directory, not a socket path")
    assert str(socket_dir / "kubelet.sock") in error
    assert list(socket_dir.iterdir()) == []
