"""The repository keeps its promises: set-up commands, CI, packaging, layering, typing."""

from __future__ import annotations

import ast
import configparser
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trio_gpu_plugin"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.S)


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]  # everything before the first section
    blocks = re.findall(r"```sh\n(.*?)\n```", head, flags=re.S)
    assert len(blocks) == 2
    assert all("\n" not in block for block in blocks), "each is one command line"
    run, test = blocks
    assert "trio-gpu-plugin demo" in run
    assert "'.[test]'" in test and "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = readme_commands()[1]
    assert test_command in ci.splitlines()


def test_ci_explains_an_empty_test_run() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert '"$rc" -eq 5' in ci and "no tests" in ci


def test_pyproject_holds_only_build_system() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    tables = re.findall(r"^\[([^\]]+)\]", text, flags=re.M)
    assert tables == ["build-system"]


def test_runtime_dependencies_are_pure_python_and_exclude_the_test_peers() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = [
        line.strip() for line in config["options"]["install_requires"].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    names = [re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower() for r in requires]
    assert names == ["trio", "purerpc", "nvidia-ml-py", "pyyaml"]
    assert "purerpc==0.8.0" in requires
    for peer in ("protobuf", "grpcio", "grpcio-tools"):
        assert peer in config["options.extras_require"]["test"]
        assert peer in config["options.extras_require"]["bench"]
    assert config["options.entry_points"]["console_scripts"].strip().splitlines() == [
        "trio-gpu-plugin = trio_gpu_plugin._cli:main",
        "nvidia-device-plugin = trio_gpu_plugin._cli:main",
    ]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_codec_is_sans_io() -> None:
    # trio_gpu_plugin.proto may use the standard library only, and none of its I/O.
    forbidden = {"trio", "anyio", "socket", "time", "os", "asyncio", "purerpc", "h2",
                 "google", "grpc", "pynvml", "threading", "subprocess"}
    for path in (PACKAGE / "proto").glob("*.py"):
        used = _imports(path)
        assert not used & forbidden, f"{path.name} imports {sorted(used & forbidden)}"
        assert used <= set(sys.stdlib_module_names) | {"__future__"}, path.name


def test_no_runtime_module_imports_protobuf_or_grpcio() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert not _imports(path) & {"google", "grpc", "grpc_tools"}, path


def test_importing_the_package_does_not_load_protobuf_or_grpcio() -> None:
    code = ("import sys, trio_gpu_plugin, trio_gpu_plugin.proto.v1beta1; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('google', 'grpc')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_bare_except_in_the_package() -> None:
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except in {path}:{node.lineno}"


def test_public_names_are_exported_and_documented() -> None:
    import trio_gpu_plugin
    import trio_gpu_plugin.proto
    import trio_gpu_plugin.testing

    for module in (trio_gpu_plugin, trio_gpu_plugin.proto, trio_gpu_plugin.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if getattr(obj, "__module__", "").startswith("purerpc"):
                continue  # Status and StatusCode are purerpc's, re-exported as they are
            if inspect.isclass(obj) or inspect.isfunction(obj):  # not type aliases
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


def test_cli_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "trio_gpu_plugin", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: trio-gpu-plugin")


@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    mypy = pytest.importorskip("mypy.api")
    stdout, stderr, status = mypy.run(["--config-file", str(ROOT / "setup.cfg"), str(PACKAGE)])
    assert status == 0, stdout + stderr


def test_a_plugin_serving_real_gpus_loads_no_simulator_and_no_yaml() -> None:
    code = ("import sys, trio_gpu_plugin, trio_gpu_plugin._cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[-1] in "
            "('_nvml_sim', '_control', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
    import trio_gpu_plugin

    assert trio_gpu_plugin.SimulatedNVML.__name__ == "SimulatedNVML"  # loaded on first use


def test_the_cli_spells_presets_and_control_ops_as_the_simulator_does() -> None:
    from trio_gpu_plugin import _cli, _control, _nvml_sim

    assert list(_cli.PRESET_NAMES) == list(_nvml_sim.PRESETS)
    assert list(_cli.CONTROL_OPS) == list(_control.CONTROL_OPS)


def test_every_command_in_the_readme_is_exercised() -> None:
    """Each console command of the README runs here or is checked by a named test."""
    readme = (ROOT / "README.md").read_text()
    commands = [line[2:] for block in re.findall(r"```console\n(.*?)```", readme, flags=re.S)
                for line in block.splitlines() if line.startswith("$ ")]
    covered_elsewhere = {
        # tests/test_deploy.py validates what these consume (no Docker engine or cluster here).
        "docker build -t registry.example.com/trio-gpu-plugin:0.1.0.dev0 .": "test_deploy",
        "kubectl apply -k k8s/": "test_deploy",
        # tests/test_cli.py::test_an_injected_xid_shows_at_the_kubelet_and_survives_sighup.
        "trio-gpu-plugin inject --control /run/tgp-control.sock xid --gpu 3 --xid 79": "test_cli",
    }
    run_here = [c for c in commands if c not in covered_elsewhere]
    assert run_here == ["trio-gpu-plugin --simulate dgx-1 inspect"]
    for command in run_here:
        args = command.split()[1:]
        result = subprocess.run([sys.executable, "-m", "trio_gpu_plugin", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert set(covered_elsewhere) <= set(commands)
