"""Every test that starts a process is marked ``integration``.

A test starts a process when its body, a helper or class of the tests package it uses, or a
fixture it asks for (defined in its module, imported into it, or in ``conftest.py``) runs
``subprocess``, ``multiprocessing``, ``os.fork`` or ``tests.processes.CeleryWorker``. Such a
test must carry ``@pytest.mark.integration`` or sit in a module whose ``pytestmark`` has it,
so ``-m "not integration"`` gives a fast run without processes. Read from the source (AST), so
nothing is imported or run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

#: attribute calls that start a process, as ``module.name``
SPAWNING_ATTRIBUTES = {
    ("subprocess", "Popen"),
    ("subprocess", "run"),
    ("subprocess", "call"),
    ("subprocess", "check_call"),
    ("subprocess", "check_output"),
    ("os", "fork"),
    ("os", "system"),
    ("os", "spawnv"),
    ("os", "posix_spawn"),
    ("asyncio", "create_subprocess_exec"),
    ("asyncio", "create_subprocess_shell"),
}
#: names whose mere use starts (or is there to start) a process
SPAWNING_NAMES = {"CeleryWorker", "multiprocessing", "ProcessPoolExecutor", "Popen"}


class Scanner:
    """Finds the tests that start processes without the ``integration`` mark."""

    def __init__(self, sources: dict[str, str]) -> None:
        #: module name relative to the tests package ("processes", "sandbox.test_sandbox")
        self.trees = {name: ast.parse(text) for name, text in sources.items()}
        self._memo: dict[tuple[str, str], bool] = {}

    @classmethod
    def from_directory(cls, root: Path) -> Scanner:
        sources = {
            ".".join(path.relative_to(root).with_suffix("").parts): path.read_text()
            for path in root.rglob("*.py")
            if "__pycache__" not in path.parts
        }
        return cls(sources)

    # -- what a module defines and imports -----------------------------------------------------

    def _definitions(self, module: str) -> dict[str, ast.AST]:
        tree = self.trees.get(module)
        if tree is None:
            return {}
        return {
            node.name: node
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }

    def _imported_from(self, module: str, name: str) -> tuple[str, str] | None:
        """The tests-package module ``name`` is imported from in ``module``, if any, and its
        name there."""
        tree = self.trees.get(module)
        if tree is None:
            return None
        package = module.split(".")[:-1]
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            original = next(
                (alias.name for alias in node.names if (alias.asname or alias.name) == name), None
            )
            if original is None:
                continue
            if node.level:  # relative: .processes from tests/, ..processes from tests/sandbox/
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                return ".".join([*base, *(node.module or "").split(".")]).strip("."), original
            if node.module and node.module.startswith("tests."):
                return node.module.removeprefix("tests."), original
        return None

    def _resolve(self, module: str, name: str) -> tuple[str, ast.AST] | None:
        seen = set()
        while (module, name) not in seen:
            seen.add((module, name))
            node = self._definitions(module).get(name)
            if node is not None:
                return module, node
            source = self._imported_from(module, name)
            if source is None:
                return None
            module, name = source
        return None

    # -- whether something starts a process ----------------------------------------------------

    def spawns(self, module: str, name: str) -> bool:
        """Whether the function, fixture or class ``name`` as seen from ``module`` starts a
        process (itself, through what it calls, or through the fixtures it asks for)."""
        found = self._resolve(module, name)
        if found is None:
            return False
        key = (found[0], getattr(found[1], "name", name))
        if key not in self._memo:
            self._memo[key] = False  # cycle guard
            self._memo[key] = self._node_spawns(*found)
        return self._memo[key]

    def _node_spawns(self, module: str, node: ast.AST) -> bool:
        own_name = getattr(node, "name", None)
        for child in ast.walk(node):
            if _spawns_directly(child):
                return True
            if (
                isinstance(child, ast.Name)
                and child.id != own_name
                and self.spawns(module, child.id)
            ):
                return True
        return any(self._fixture_spawns(module, arg) for arg in _parameters(node))

    def _fixture_spawns(self, module: str, name: str) -> bool:
        if self._resolve(module, name) is not None:
            return self.spawns(module, name)
        return self.spawns("conftest", name)

    # -- the check ------------------------------------------------------------------------------

    def unmarked(self) -> Iterator[str]:
        """``module::test`` for each test that starts a process but is not marked."""
        for module, tree in sorted(self.trees.items()):
            if not module.rpartition(".")[2].startswith("test_"):
                continue
            if any(_marks_integration(node) for node in _pytestmark_values(tree)):
                continue
            for node in tree.body:
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                if not node.name.startswith("test"):
                    continue
                if any(_marks_integration(d) for d in node.decorator_list):
                    continue
                if self.spawns(module, node.name):
                    yield f"{module}::{node.name}"


def _spawns_directly(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return (node.value.id, node.attr) in SPAWNING_ATTRIBUTES
    if isinstance(node, ast.Name):
        return node.id in SPAWNING_NAMES
    if isinstance(node, ast.Import | ast.ImportFrom):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names]
        return any(name.split(".")[0] in SPAWNING_NAMES for name in names)
    return False


def _parameters(node: ast.AST) -> list[str]:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return []
    return [arg.arg for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]


def _pytestmark_values(tree: ast.Module) -> Iterator[ast.AST]:
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        ) or (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "pytestmark"
            and node.value is not None
        ):
            yield node.value


def _marks_integration(node: ast.AST) -> bool:
    """Whether ``node`` contains ``pytest.mark.integration``."""
    return any(
        isinstance(child, ast.Attribute)
        and child.attr == "integration"
        and isinstance(child.value, ast.Attribute)
        and child.value.attr == "mark"
        for child in ast.walk(node)
    )


# -- the tests ----------------------------------------------------------------------------------


def test_every_test_that_starts_a_process_is_marked_integration() -> None:
    unmarked = list(Scanner.from_directory(TESTS).unmarked())
    assert not unmarked, (
        "These tests start processes (subprocess, multiprocessing, CeleryWorker) but are not "
        "marked; add @pytest.mark.integration (or put it in the module's pytestmark):\n  "
        + "\n  ".join(unmarked)
    )


PROCESSES = """
import subprocess
class CeleryWorker:
    def start(self):
        self.process = subprocess.Popen(["celery"])
def wait_for(condition):
    return condition()
"""

CONFTEST = """
import pytest
@pytest.fixture
def account():
    return 1
"""

HELPERS = """
import subprocess
import pytest
from .processes import CeleryWorker, wait_for
from tests.processes import CeleryWorker as Worker

def run_manage(*args):
    return subprocess.run(["python", "manage.py", *args])

def indirect():
    return run_manage("check")

@pytest.fixture
def worker():
    return CeleryWorker()

@pytest.fixture
def started(worker, account):
    return worker
"""


@pytest.mark.parametrize(
    ("body", "flagged"),
    [
        ("def test_x():\n    subprocess.run(['true'])", True),
        ("@pytest.mark.integration\ndef test_x():\n    subprocess.run(['true'])", False),
        ("def test_x():\n    indirect()", True),
        ("def test_x():\n    Worker().start()", True),
        ("def test_x(started):\n    pass", True),
        ("def test_x(account):\n    wait_for(lambda: account)", False),
        ("def test_x():\n    import multiprocessing", True),
        ("@pytest.mark.parametrize('a', [1])\ndef test_x(a, worker):\n    pass", True),
    ],
)
def test_the_scanner_finds_tests_that_start_processes(body: str, flagged: bool) -> None:
    scanner = Scanner(
        {
            "processes": PROCESSES,
            "conftest": CONFTEST,
            "test_example": HELPERS + "\n" + body,
        }
    )
    assert list(scanner.unmarked()) == (["test_example::test_x"] if flagged else [])


@pytest.mark.parametrize(
    "pytestmark",
    [
        "pytestmark = pytest.mark.integration",
        "pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]",
    ],
)
def test_a_module_pytestmark_covers_its_tests(pytestmark: str) -> None:
    source = (
        f"import subprocess\nimport pytest\n{pytestmark}\ndef test_x():\n    subprocess.run([])"
    )
    scanner = Scanner({"sandbox.test_example": source, "conftest": CONFTEST})
    assert list(scanner.unmarked()) == []
    scanner = Scanner(
        {"sandbox.test_example": source.replace(pytestmark, ""), "conftest": CONFTEST}
    )
    assert list(scanner.unmarked()) == ["sandbox.test_example::test_x"]
