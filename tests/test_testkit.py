"""The test kit as another project meets it (#14 item 9): waiting for the *next*
registration, one public preset registry, a ``testing`` extra that brings what the
fixtures need, the README saying how to run them, and docstrings that cite only files
that exist.

Time bounds are hang guards, never timing asserts.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

import pytest
import trio
import trio.testing
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_fake_kubelet import Plugin
from trio_gpu_plugin import testing
from trio_gpu_plugin.testing import FakeKubelet

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trio_gpu_plugin"
HANG_GUARD = 10.0
GPU = "nvidia.com/gpu"


# --- FakeKubelet.wait_registered after a restart ---------------------------------------


async def test_wait_registered_after_a_mark_waits_for_the_next_registration(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    kubelet = FakeKubelet(socket_dir)
    await nursery.start(kubelet.run)
    plugin = Plugin(socket_dir / "p.sock")
    await plugin.serve(nursery)
    await plugin.register(kubelet)
    first = await kubelet.wait_registered(GPU, timeout=HANG_GUARD)
    mark = kubelet.registration_count(GPU)
    assert mark == 1

    await kubelet.restart()
    # Counted in all, the registration from before the restart still satisfies a plain
    # wait: that is what the mark is for.
    assert await kubelet.wait_registered(GPU, timeout=HANG_GUARD) is first

    seen: list[testing.RegistrationRecord] = []
    done = trio.Event()

    async def wait_for_the_next() -> None:
        seen.append(await kubelet.wait_registered(GPU, after=mark, timeout=HANG_GUARD))
        done.set()

    nursery.start_soon(wait_for_the_next)
    await trio.testing.wait_all_tasks_blocked()
    assert seen == [], "returned before the plugin registered again"

    await plugin.serve(nursery)  # the restart removed its socket
    await plugin.register(kubelet)
    with trio.fail_after(HANG_GUARD):
        await done.wait()
    assert seen[0] is kubelet.registrations[-1] and seen[0] is not first
    assert seen[0].accepted
    assert kubelet.registration_count(GPU) == 2
    assert kubelet.resources[GPU].connected


async def test_wait_registered_refuses_a_count_or_mark_it_could_never_mean(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    kubelet = FakeKubelet(socket_dir)
    await nursery.start(kubelet.run)
    assert kubelet.registration_count(GPU) == 0
    with pytest.raises(ValueError, match="count=0"):
        await kubelet.wait_registered(GPU, count=0)
    with pytest.raises(ValueError, match="after=-1"):
        await kubelet.wait_registered(GPU, after=-1)


# --- one preset registry ----------------------------------------------------------------


def test_testing_presets_are_the_simulators_registry_that_simulate_takes() -> None:
    from trio_gpu_plugin import _cli, _nvml_sim

    assert testing.PRESETS is _nvml_sim.PRESETS
    assert list(testing.PRESETS) == list(_cli.PRESET_NAMES)
    for name, spec in testing.PRESETS.items():
        assert isinstance(spec, testing.SimNodeSpec) and spec.name == name
        nvml = testing.SimulatedNVML(spec)
        nvml.nvmlInit()
        try:
            assert nvml.nvmlDeviceGetCount() == len(spec.gpus)
        finally:
            nvml.nvmlShutdown()


def test_every_simulated_device_source_preset_is_a_registry_preset() -> None:
    # SimulatedDeviceSource.preset() keeps names of its own; each must be a registry
    # preset with the same GPUs, so a name means one node whichever way it is used.
    from trio_gpu_plugin import _simulated

    for name, gpus in _simulated.PRESETS.items():
        spec = testing.PRESETS[name]
        assert [g.model for g in gpus] == [g.name for g in spec.gpus], name
        assert [g.numa_node for g in gpus] == [g.numa_node for g in spec.gpus], name


# --- the testing extra ------------------------------------------------------------------


def extras() -> dict[str, list[Requirement]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    section = parser["options.extras_require"]
    found = {name: [Requirement(line.strip()) for line in section[name].splitlines()
                    if line.strip()] for name in section}
    found[""] = [Requirement(line.strip()) for line in
                 parser["options"]["install_requires"].splitlines() if line.strip()]
    return found


def imported_top_level(path: pathlib.Path) -> set[str]:
    """Top-level modules a file imports, outside the package and the standard library."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names
            if n not in sys.stdlib_module_names and n not in {"trio_gpu_plugin", "__future__"}}


def test_the_testing_extra_brings_what_the_fixtures_need() -> None:
    declared = extras()
    provided = {canonicalize_name(r.name) for r in declared[""] + declared["testing"]}
    # The async fixtures take pytest-trio's `nursery` fixture and run under its runner.
    assert "pytest-trio" in provided
    distributions = importlib.metadata.packages_distributions()
    for path in sorted((PACKAGE / "testing").glob("*.py")):
        for module in imported_top_level(path):
            owners = {canonicalize_name(d) for d in distributions.get(module, [])}
            assert owners & provided, (
                f"{path.relative_to(ROOT)} imports {module} ({sorted(owners)}), which "
                "neither install_requires nor the testing extra brings")


def test_the_readme_says_how_to_run_the_fixtures() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Test kit\n", 1)[1].split("\n## ", 1)[0]
    assert "trio-gpu-plugin[testing]" in section
    assert "trio_mode = true" in section
    assert "@pytest.mark.trio" in section
    assert "registration_count" in section and "after=" in section


# --- docstrings cite only what exists ---------------------------------------------------


#: What reads as a citation of this repository's files: a document (``kubelet.md``,
#: ``shared/reference/python-stack.md``) or a path under one of its top-level
#: directories (``bench/soak.py``).  Example file names in prose (``config.yaml``) and
#: upstream paths (``pkg/kubelet/...``) are not citations.
CITED = re.compile(
    r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md|(?:shared|trio_gpu_plugin|tests|bench|k8s|protos|\.ci)"
    r"/[\w./-]*\w)")


def cited_files(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, cited name) for each file a docstring or comment of ``path`` names."""
    return [(number, match[1])
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            for match in CITED.finditer(line) if "://" not in line]


def exists_in_repo(name: str) -> bool:
    if (ROOT / name).exists():
        return True
    # A bare document name: anywhere in the repository.
    return "/" not in name and any(True for _ in ROOT.glob(f"**/{name}"))


def test_the_citation_check_sees_what_it_must() -> None:
    cited = [name for _, name in cited_files(pathlib.Path(__file__))]
    assert "shared/reference/python-stack.md" in cited and "kubelet.md" in cited
    assert not exists_in_repo("kubelet.md")
    assert exists_in_repo("README.md") and exists_in_repo("trio_gpu_plugin/_transport.py")


def test_the_test_kit_cites_no_file_that_is_not_in_the_repository() -> None:
    missing = [f"{path.relative_to(ROOT)}:{line}: {name}"
               for path in sorted((PACKAGE / "testing").glob("*.py"))
               for line, name in cited_files(path) if not exists_in_repo(name)]
    assert not missing, missing


def test_the_package_cites_no_file_that_is_not_in_the_repository() -> None:
    missing = [f"{path.relative_to(ROOT)}:{line}: {name}"
               for path in sorted(PACKAGE.rglob("*.py"))
               for line, name in cited_files(path) if not exists_in_repo(name)]
    assert not missing, missing
