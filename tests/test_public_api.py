"""Every public name is documented: what ``__all__`` lists in the package and its public
subpackages has a docstring, and so has each public method and property of a public
class (issue 15, item 7)."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
from collections.abc import Iterator

import pytest

PUBLIC_MODULES = ("trio_gpu_plugin", "trio_gpu_plugin.testing", "trio_gpu_plugin.proto",
                  "trio_gpu_plugin.proto.v1beta1")
#: Re-exported as they are, documented where they come from: purerpc's gRPC status types.
FOREIGN = {"Status": "purerpc", "StatusCode": "purerpc"}


def _documented(obj: object) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


def _ours(obj: object) -> bool:
    return (getattr(obj, "__module__", "") or "").startswith("trio_gpu_plugin")


def _public_names() -> Iterator[tuple[str, object]]:
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            yield f"{module_name}.{name}", getattr(module, name)


def _undocumented(qualname: str, obj: object) -> Iterator[str]:
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
        return  # constants and type aliases: documented by the comment where defined
    if not _ours(obj) and not inspect.ismodule(obj):
        return
    if not _documented(obj):
        yield qualname
    if not inspect.isclass(obj):
        return
    # The NVML protocol lists pynvml's own calls by pynvml's names: NVML documents them.
    if obj.__name__ == "NVML":
        return
    for member, value in vars(obj).items():
        if member.startswith("_"):
            continue
        target = value.fget if isinstance(value, property) else value
        if isinstance(target, (staticmethod, classmethod)):
            target = target.__func__
        if inspect.isfunction(target) and not _documented(target):
            yield f"{qualname}.{member}"


def test_every_public_name_and_member_has_a_docstring() -> None:
    missing = [q for qualname, obj in _public_names() for q in _undocumented(qualname, obj)]
    assert missing == []


def test_foreign_public_names_are_only_the_known_ones() -> None:
    foreign = {qualname.rsplit(".", 1)[1]: getattr(obj, "__module__", "")
               for qualname, obj in _public_names()
               if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _ours(obj)}
    assert {name: module.split(".")[0] for name, module in foreign.items()} == FOREIGN


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_module_has_a_docstring_and_an_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert _documented(module)
    assert list(module.__all__) and all(hasattr(module, n) for n in module.__all__)


def test_the_check_sees_an_undocumented_member() -> None:
    class Public:
        """Documented."""

        def method(self) -> None:
            pass

    Public.__module__ = "trio_gpu_plugin._example"
    assert list(_undocumented("x.Public", Public)) == ["x.Public.method"]


def test_every_readme_example_imports_public_names_only_and_is_run_by_a_test() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"(<!-- example: (\S+) -->\n)?```python\n(.*?)\n```", readme, flags=re.S)
    assert blocks
    tests = "".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    for _, name, code in blocks:
        assert name, f"a README python block without an <!-- example: name --> marker:\n{code}"
        assert f"<!-- example: {name} -->" in tests, f"no test runs the README example {name!r}"
        modules = re.findall(r"^\s*(?:from|import) ([\w.]+)", code, flags=re.M)
        private = [m for m in modules if any(part.startswith("_") for part in m.split("."))]
        assert private == [], (name, private)


def test_every_configuration_field_is_documented_with_nvidias_names() -> None:
    import dataclasses

    from trio_gpu_plugin._config import FLAGS, Flags, Imex, PluginFlags

    classes = {"flags": Flags, "flags.plugin": PluginFlags, "imex": Imex}
    for cls in classes.values():
        doc = inspect.getdoc(cls) or ""
        attributes = doc.split("Attributes:", 1)[1]
        for field in dataclasses.fields(cls):
            assert f"\n    {field.name}: " in "\n" + attributes, (cls.__name__, field.name)
    for spec in FLAGS:
        if spec.attr is None:
            continue  # the process's own (--simulate, --log-level): no Config field
        doc = inspect.getdoc(classes[spec.attr.rpartition(".")[0]]) or ""
        assert spec.name in doc and all(e in doc for e in spec.envs), spec.name
        assert spec.config_key is None or spec.config_key in doc, spec.name
