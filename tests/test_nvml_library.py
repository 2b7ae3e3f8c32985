"""Which libnvidia-ml.so.1 the plugin loads, and that it says so.

A driver root (``/driver-root`` in the DaemonSet) is the host's filesystem mounted in the
container: its links name host paths.  Laid out here as drivers install it, with the
versioned library behind a chain of links.
"""

from __future__ import annotations

import logging
import os
import pathlib

import pynvml
import pytest

from trio_gpu_plugin._nvml import find_library, load_pynvml, resolve_in_root

VERSIONED = "libnvidia-ml.so.550.54.15"


@pytest.fixture
def no_loaded_library(monkeypatch: pytest.MonkeyPatch) -> None:
    # load_pynvml hands pynvml a library only while none is loaded; never leave one.
    monkeypatch.setattr(pynvml, "nvmlLib", None)


def driver_root(tmp_path: pathlib.Path, link: str) -> pathlib.Path:
    root = tmp_path / "driver-root"
    lib = root / "usr" / "lib64"
    lib.mkdir(parents=True)
    (lib / VERSIONED).write_bytes(b"not really a shared object")
    (lib / "libnvidia-ml.so.1").symlink_to(link)
    return root


def test_an_absolute_link_in_the_driver_root_resolves_inside_it(tmp_path: pathlib.Path) -> None:
    # /usr/lib64/<versioned> exists on the host, i.e. under the root here; the container's
    # own /usr/lib64 must not be where it leads.
    root = driver_root(tmp_path, f"/usr/lib64/{VERSIONED}")
    assert find_library(str(root)) == str(root / "usr" / "lib64" / VERSIONED)


def test_a_relative_link_resolves_as_usual_and_never_above_the_root(tmp_path: pathlib.Path) -> None:
    root = driver_root(tmp_path, VERSIONED)
    assert find_library(str(root)) == str(root / "usr" / "lib64" / VERSIONED)
    (root / "escape").symlink_to("../../../../../../etc")
    assert resolve_in_root(str(root), str(root / "escape" / "x")) == str(root / "etc" / "x")


def test_a_chain_of_absolute_links_stays_in_the_root(tmp_path: pathlib.Path) -> None:
    root = driver_root(tmp_path, "/usr/lib/libnvidia-ml.so.1")
    (root / "usr" / "lib").mkdir()
    (root / "usr" / "lib" / "libnvidia-ml.so.1").symlink_to(f"/usr/lib64/{VERSIONED}")
    assert find_library(str(root)) == str(root / "usr" / "lib64" / VERSIONED)


def test_a_link_loop_is_an_error_not_a_hang(tmp_path: pathlib.Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    root = driver_root(tmp_path, "/usr/lib64/libnvidia-ml.so.1")
    assert find_library(str(root)) is None
    assert "cannot resolve" in caplog.text


def test_a_library_that_does_not_load_is_logged_with_the_fallback(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, no_loaded_library: None) -> None:
    root = driver_root(tmp_path, VERSIONED)
    caplog.set_level(logging.INFO, "trio_gpu_plugin.nvml")
    load_pynvml(str(root))
    assert pynvml.nvmlLib is None  # nvmlInit will use the dynamic loader's
    [line] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = line.getMessage()
    assert f"cannot load {root / 'usr' / 'lib64' / VERSIONED}" in message
    assert "falling back to the dynamic loader's search path" in message


def test_a_driver_root_without_the_library_says_where_it_looked(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, no_loaded_library: None) -> None:
    root = tmp_path / "empty-root"
    root.mkdir()
    load_pynvml(str(root))
    assert f"no libnvidia-ml.so.1 under the driver root {root}" in caplog.text
    assert "usr/lib64" in caplog.text


def test_the_hosts_own_root_needs_no_search(caplog: pytest.LogCaptureFixture,
                                            no_loaded_library: None) -> None:
    caplog.set_level(logging.DEBUG, "trio_gpu_plugin.nvml")
    load_pynvml("/")
    assert pynvml.nvmlLib is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert os.path.abspath("/") == "/"
