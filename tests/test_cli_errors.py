"""Every flag of the command line given a bad value: one ``error:`` line that names the
flag, exit status 1 (a value that cannot be used) or 2 (a malformed command line), and
never a Python traceback.

The flags are enumerated from the parser itself, subcommands included, so a new flag is
covered as soon as it exists: a flag whose parser refuses some value gets that value; a
flag the parser accepts any text for must be listed below with the values start-up
refuses, or as accepted as given (NVIDIA's plugin reads those the same way), or the
test that classifies the flags fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from trio_gpu_plugin._cli import build_parser
from trio_gpu_plugin.testing import FakeKubelet

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
HANG_GUARD = 30.0
# Tried in turn on a flag's own converter: what every typed flag refuses.
PROBES = ("bogus", "-1", "0")
# Longer than a Unix socket path can be (107 bytes).
LONG = "/tmp/" + "x" * 120

# Free-form flags whose bad values only start-up can see; {busy} is a port something
# listens on, {file} a regular file.
START_UP_BAD: dict[str, tuple[str, ...]] = {
    "--kubelet-socket": ("", f"{LONG}/kubelet.sock"),
    "--config-file": ("/nonexistent/config.yaml", "/proc"),
    "--simulate": ("no-such-preset",),
    "--simulate-control": ("/nonexistent/control.sock", "/proc/control.sock", "{file}",
                           "{file}/control.sock", f"{LONG}/control.sock"),
    "--metrics-address": ("no-port", "127.0.0.1:{busy}", "no-such-host.invalid:9402",
                          "192.0.2.1:9402"),
}
# How an error names a flag when not by the flag itself.
NAMED_AS = {"--config-file": "config file"}
# Free-form flags whose every value is taken as given, as NVIDIA's plugin takes them (a
# path or a prefix is only used where the configuration needs it).
ACCEPTED_AS_GIVEN = {
    "--driver-root": "/nonexistent driver root", "--dev-root": "/nonexistent",
    "--driver-root-ctr-path": "/nonexistent", "--mps-root": "relative/mps",
    "--cdi-annotation-prefix": "not a prefix", "--nvidia-cdi-hook-path": "/nonexistent",
    "--cdi-kind": "no-slash", "--cdi-feature-flags": "bogus", "--cdi-disable-hooks": "bogus",
}
# inject's free-form flags: the running plugin's control socket says what is wrong.
INJECT_SERVER_CHECKED = {"--gpu": "nine", "--action": "bogus", "--calls": "nvmlNope",
                         "--code": "bogus"}
INJECT_BAD_CONTROL = "/nonexistent/control.sock"


def parsers() -> Iterator[tuple[str | None, argparse.ArgumentParser]]:
    """The top-level parser (``None``) and each subcommand's."""
    parser = build_parser()
    yield None, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def takes_a_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(
        action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))


def name_of(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


def refused_value(action: argparse.Action) -> str | None:
    """A value the flag's own converter or choices refuse, or None for free text."""
    for probe in PROBES:
        try:
            value = action.type(probe) if callable(action.type) else probe
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return probe
        if action.choices is not None and value not in action.choices:
            return probe
    return None


def value_flags() -> list[tuple[str | None, argparse.Action]]:
    # A subcommand that repeats the serving flags (inspect) takes them as the top level
    # does, from the same FLAGS: they are run once, at the top level.
    top = {a.dest for command, parser in parsers() if command is None for a in parser._actions}
    return [(command, action) for command, parser in parsers() for action in parser._actions
            if takes_a_value(action) and (command is None or action.dest not in top)]


def argv(command: str | None, action: argparse.Action, value: str,
         kubelet_socket: str) -> list[str]:
    """A command line that can start, with ``action`` given ``value``."""
    flag = [f"{action.option_strings[0]}={value}"] if action.option_strings else [value]
    if command is None:
        return ["--simulate", "pcie-4", "--kubelet-socket", kubelet_socket, *flag]
    if command == "inject":
        if action.dest == "op":
            return ["inject", "--control", INJECT_BAD_CONTROL, *flag]
        return ["inject", "--control", INJECT_BAD_CONTROL, *flag, "xid", "--gpu", "1"]
    if command == "inspect":
        return ["--simulate", "pcie-4", "inspect", *flag]
    return [command, *flag]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (
        "SIMULATE", "SIMULATE_CONTROL", "KUBELET_SOCKET", "CONFIG_FILE", "METRICS_ADDRESS",
        "LOG_LEVEL", "LOG_FORMAT")}
    return subprocess.run([sys.executable, "-m", "trio_gpu_plugin", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


def assert_one_error_line_naming(result: subprocess.CompletedProcess[str],
                                 *named: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode in (1, 2), output
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(("trio-gpu-plugin: error: ", "trio-gpu-plugin ")), errors
    assert all(n in errors[0] for n in named), (named, errors[0])


def test_every_flag_is_refused_by_its_parser_or_classified_here() -> None:
    free_text = {(command, name_of(action)) for command, action in value_flags()
                 if refused_value(action) is None}
    classified = {(None, flag) for flag in (*START_UP_BAD, *ACCEPTED_AS_GIVEN)} | {
        ("inject", flag) for flag in INJECT_SERVER_CHECKED} | {("inject", "--control")}
    assert free_text == classified, (
        "a flag that takes any text needs its bad values in START_UP_BAD (or INJECT_"
        "SERVER_CHECKED), or a place in ACCEPTED_AS_GIVEN")


REFUSED = [(command, action, value) for command, action in value_flags()
           if (value := refused_value(action)) is not None]


@pytest.mark.parametrize(("command", "action", "value"), REFUSED,
                         ids=[f"{c or 'serve'} {name_of(a)}={v}" for c, a, v in REFUSED])
def test_a_value_the_parser_refuses_is_a_usage_error_naming_the_flag(
        socket_dir: pathlib.Path, command: str | None, action: argparse.Action,
        value: str) -> None:
    result = run(*argv(command, action, value, str(socket_dir / "kubelet.sock")))
    assert_one_error_line_naming(result, name_of(action))
    assert result.returncode == 2


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A TCP port something listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


START_UP = [(flag, value) for flag, values in START_UP_BAD.items() for value in values]


@pytest.mark.parametrize(("flag", "value"), START_UP, ids=[f"{f}={v}" for f, v in START_UP])
def test_a_value_start_up_cannot_use_stops_it_with_one_line_naming_the_flag(
        socket_dir: pathlib.Path, busy_port: int, flag: str, value: str) -> None:
    regular = socket_dir / "regular-file"
    regular.write_text("not a socket\n")
    value = value.format(busy=busy_port, file=regular)
    result = run("--simulate", "pcie-4", "--kubelet-socket", str(socket_dir / "kubelet.sock"),
                 "--simulate-control", str(socket_dir / "control.sock"), f"{flag}={value}")
    assert_one_error_line_naming(result, NAMED_AS.get(flag, flag), value)


def test_inject_to_a_socket_nobody_serves_names_control() -> None:
    result = run("inject", "--control", INJECT_BAD_CONTROL, "list")
    assert_one_error_line_naming(result, f"--control {INJECT_BAD_CONTROL}")
    assert result.returncode == 1


async def start_plugin(kubelet: FakeKubelet, *args: str) -> trio.Process:
    env = {k: v for k, v in os.environ.items() if k not in ("SIMULATE", "KUBELET_SOCKET")}
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--simulate", "pcie-4", "--kubelet-socket",
         str(kubelet.kubelet_socket), *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=env)


async def stop(process: trio.Process) -> str:
    """SIGTERM, then the whole stderr; the exit status must be 0."""
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    err = b""
    with trio.fail_after(HANG_GUARD):
        while chunk := await process.stderr.receive_some():
            err += chunk
        code = await process.wait()
    assert code == 0, err.decode()
    return err.decode()


async def test_free_form_values_taken_as_given_still_serve_and_stop_cleanly(
        fake_kubelet: FakeKubelet) -> None:
    process = await start_plugin(fake_kubelet, *(f"{flag}={value}" for flag, value in
                                                 ACCEPTED_AS_GIVEN.items()))
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        err = await stop(process)
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
    assert "Traceback" not in err and " error: " not in err, err


async def test_inject_values_the_plugin_refuses_name_their_key_and_exit_1(
        fake_kubelet: FakeKubelet, socket_dir: pathlib.Path) -> None:
    control = str(socket_dir / "control.sock")
    ops = {"--gpu": ("xid", "--xid", "79"), "--action": ("recovery-action", "--gpu", "1"),
           "--calls": ("fail", "--gpu", "1", "--code", "gpu_is_lost"),
           "--code": ("fail", "--gpu", "1", "--calls", "nvmlDeviceGetName")}
    process = await start_plugin(fake_kubelet, "--simulate-control", control)
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        for flag, value in INJECT_SERVER_CHECKED.items():
            op, *rest = ops[flag]
            result = await trio.to_thread.run_sync(
                lambda: run("inject", "--control", control, op, *rest, f"{flag}={value}"))
            assert "Traceback" not in result.stdout + result.stderr
            assert result.returncode == 1, result
            error = json.loads(result.stdout)["error"]
            assert flag.removeprefix("--") in error or value in error, error
        await stop(process)
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
