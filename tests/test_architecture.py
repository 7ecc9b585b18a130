"""The arrows that must never exist (ARCHITECTURE.md), checked on the source with `ast`: nothing is imported.

Each rule in `RULES` names the modules it applies to, what they must not import, and why. Import rules are
transitive over the project's own modules: a learner that imports a helper module that imports Lightning
breaks the learner rule, and the message names the chain. Imports inside functions count (a lazy import is
still an arrow); imports under ``if TYPE_CHECKING:`` do not.

`check(root)` runs every rule on a source tree; the last tests plant violations in a fake tree under
``tmp_path`` to show the checker catches each kind.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("imaging_meta", "datamodules")
# also scanned for the pytorch_lightning rule only
EXTRA_TREES = ("tests", "benchmarks")

LEARNER_SIDE = (
    "imaging_meta.learners", "imaging_meta.episode", "imaging_meta.tasks", "imaging_meta.backbones", "imaging_meta.volume",
)
TASK_KINDS = ("segmentation", "classification")


@dataclass(frozen=True)
class Rule:
    """One arrow that must never exist.

    Attributes:
        name: the test id.
        scope: fnmatch patterns of dotted module names the rule applies to (a pattern ``a.b`` also covers
            ``a.b.*``).
        reason: why the arrow is forbidden; printed with every violation.
        forbidden: import prefixes the scope must not reach (``a.b`` covers ``a.b`` and ``a.b.*``).
        allowed: exceptions to ``forbidden`` (same prefix matching).
        kind: ``import`` (the default), ``file_io`` (calls that read or write files) or ``task_string`` (a
            comparison with a task-kind string).
        exempt: patterns of modules in ``scope`` the rule skips; an import rule does not follow imports into them
            either (what an exempt module imports is its own business).
        trees: top-level folders whose files are in the scope (default: the two packages).
    """

    name: str
    scope: tuple[str, ...]
    reason: str
    forbidden: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    kind: str = "import"
    exempt: tuple[str, ...] = ()
    trees: tuple[str, ...] = PACKAGES


RULES: tuple[Rule, ...] = (
    Rule(
        "learners_no_lightning_data_or_app",
        scope=LEARNER_SIDE,
        forbidden=("lightning", "pytorch_lightning", "datamodules", "imaging_meta.module", "imaging_meta.commands",
                   "imaging_meta.evaluation", "imaging_meta.checkpoint_io"),
        reason="a learner is a plain nn.Module usable without Lightning, data loading, reports or checkpoint files; "
               "the Lightning module, the datamodules and the commands depend on learners, never the reverse",
    ),
    Rule(
        "learners_no_file_io",
        scope=LEARNER_SIDE,
        kind="file_io",
        reason="learners take tensors and return tensors: reading and writing files (weights, episodes, reports) "
               "belongs to checkpoint_io, the datamodules and the commands (and to imaging_meta.pretrained, which "
               "reads the pretrained weights a config names)",
    ),
    Rule(
        "no_network_outside_pretrained",
        scope=("*",),
        forbidden=("urllib", "http", "socket", "requests", "torch.hub", "ftplib"),
        exempt=("imaging_meta.pretrained",),
        reason="nothing reaches the network at run time unless the user's config asks for it, and then only "
               "imaging_meta.pretrained does (the weights a config names by URL); tests never download",
    ),
    Rule(
        "datamodules_only_episode_from_imaging_meta",
        scope=("datamodules",),
        forbidden=("imaging_meta",),
        allowed=("imaging_meta.episode",),
        reason="data goes from files to Episodes; the Episode contract is the only thing the data side shares "
               "with the learning side, so datamodules can be used (and tested) without learners or Lightning code",
    ),
    Rule(
        "samplers_no_pixel_loading",
        scope=("datamodules.sampling.samplers*",),
        forbidden=("monai", "nibabel", "pydicom", "PIL", "skimage", "datamodules.io", "datamodules.transforms",
                   "datamodules.sources", "datamodules.synthetic"),
        # a file writer for the episode lists (JSON), not a pixel loader
        allowed=("datamodules.io.atomic",),
        reason="an EpisodeSampler works on labels and indices only, so it checks feasibility and draws episodes "
               "without touching images (fast, and each DDP rank can draw its own episodes cheaply)",
    ),
    Rule(
        "no_pytorch_lightning",
        scope=("*",),
        forbidden=("pytorch_lightning",),
        trees=PACKAGES + EXTRA_TREES,
        reason="the project uses the unified `lightning` package (`lightning.pytorch`); mixing in "
               "`pytorch_lightning` gives two incompatible class hierarchies (a pytorch_lightning Callback is "
               "not a lightning.pytorch Callback)",
    ),
    Rule(
        "task_kind_strings_only_in_tasks",
        scope=("*",),
        kind="task_string",
        exempt=("imaging_meta.tasks",),
        reason="imaging_meta/tasks.py is the one place that knows the task kinds; elsewhere ask the Task object "
               "(get_task(name)) instead of switching on the strings 'segmentation' / 'classification'",
    ),
)

# classes named like this are episode samplers; they must live where `samplers_no_pixel_loading` sees them
SAMPLER_CLASS = "*Sampler"
SAMPLER_MODULES = next(r for r in RULES if r.name == "samplers_no_pixel_loading").scope


# --------------------------------------------------------------------------------------------- the checker
@dataclass(frozen=True)
class Import:
    target: str  # dotted module name, resolved (relative imports made absolute)
    line: int


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)


@dataclass(frozen=True)
class Violation:
    rule: str
    module: str
    path: str
    line: int
    what: str
    via: tuple[str, ...] = ()

    def __str__(self) -> str:
        chain = f" (reached from {' -> '.join(self.via)})" if self.via else ""
        return f"{self.path}:{self.line}: {self.what}{chain}"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _in_scope(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines of statements under ``if TYPE_CHECKING:`` (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _imports(mod: Module, known: set[str]) -> list[Import]:
    is_package = mod.path.name == "__init__.py"
    skip = _type_checking_lines(mod.tree)
    out = []
    for node in ast.walk(mod.tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = mod.name.split(".") if is_package else mod.name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                out.append(Import(sub if sub in known else base, node.lineno))
    return out


def load_modules(root: Path, trees: tuple[str, ...] = PACKAGES + EXTRA_TREES) -> dict[str, Module]:
    """Parse every .py file under ``root/<tree>`` for each tree that exists: {dotted name: Module}."""
    mods = {}
    for tree in trees:
        if not (root / tree).is_dir():
            continue
        for path in sorted((root / tree).rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            name = _module_name(path, root)
            mods[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    known = set(mods)
    for mod in mods.values():
        mod.imports = _imports(mod, known)
    return mods


def _violates(rule: Rule, target: str) -> bool:
    return any(_under(target, f) for f in rule.forbidden) and not any(_under(target, a) for a in rule.allowed)


def _reachable(rule: Rule, start: str, mods: dict[str, Module]) -> dict[str, tuple[str, ...]]:
    """Project modules importing ``start`` runs, with the chain that leads to each: import targets and their
    parent packages, not followed past an import that already breaks ``rule`` (that one is reported)."""
    seen = {start: (start,)}
    todo = [start]
    while todo:
        cur = todo.pop()
        nxt = set()
        for imp in mods[cur].imports:
            if not _violates(rule, imp.target):
                parts = imp.target.split(".")
                nxt.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        for name in sorted(nxt & mods.keys()):
            if name not in seen and not _in_scope(name, rule.exempt):  # an exempt module's imports are its own
                seen[name] = seen[cur] + (name,)
                todo.append(name)
    return seen


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _check_imports(rule: Rule, mods: dict[str, Module], root: Path, scoped: list[str]) -> list[Violation]:
    found: dict[tuple, Violation] = {}
    for start in scoped:
        for name, chain in _reachable(rule, start, mods).items():
            mod = mods[name]
            for imp in mod.imports:
                if _violates(rule, imp.target):
                    key = (name, imp.line, imp.target)
                    via = () if name in scoped else chain
                    if key not in found or len(via) < len(found[key].via):
                        found[key] = Violation(rule.name, name, _rel(mod.path, root), imp.line, f"imports {imp.target}", via)
    return list(found.values())


FILE_IO_CALLS = {"open"}
FILE_IO_ATTRS = {("torch", "save"), ("torch", "load"), ("np", "save"), ("np", "load"), ("np", "savez"),
                 ("numpy", "save"), ("numpy", "load"), ("pickle", "dump"), ("pickle", "load"), ("io", "open"),
                 ("os", "open"), ("json", "dump"), ("json", "load")}
FILE_IO_METHODS = {"write_text", "write_bytes", "read_text", "read_bytes"}


def _file_io_calls(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in FILE_IO_CALLS:
            out.append((node.lineno, f"{f.id}(...)"))
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if (owner, f.attr) in FILE_IO_ATTRS or f.attr in FILE_IO_METHODS:
                out.append((node.lineno, f"{owner or '...'}.{f.attr}(...)"))
    return out


def _is_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in TASK_KINDS
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_kind(e) for e in node.elts)
    return False


def _task_string_compares(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_is_kind(n) for n in [node.left, *node.comparators]):
            out.append((node.lineno, f"compares with a task-kind string: {ast.unparse(node)}"))
        elif isinstance(node, ast.MatchValue) and _is_kind(node.value):
            out.append((node.value.lineno, f"matches a task-kind string: case {ast.unparse(node.value)}"))
    return out


def check(root: Path, rules: tuple[Rule, ...] = RULES) -> list[Violation]:
    """Every violation of ``rules`` in the source tree at ``root``."""
    all_mods = _load_cached(root) if root == REPO else load_modules(root)
    out: list[Violation] = []
    for rule in rules:
        mods = {n: m for n, m in all_mods.items() if n.split(".")[0] in rule.trees}
        scoped = [n for n in mods if _in_scope(n, rule.scope) and not _in_scope(n, rule.exempt)]
        if rule.kind == "import":
            out += _check_imports(rule, mods, root, scoped)
            continue
        finder = {"file_io": _file_io_calls, "task_string": _task_string_compares}[rule.kind]
        for name in scoped:
            out += [Violation(rule.name, name, _rel(mods[name].path, root), line, what)
                    for line, what in finder(mods[name].tree)]
    return sorted(out, key=lambda v: (v.rule, v.path, v.line))


@cache
def _load_cached(root: Path) -> dict[str, Module]:
    return load_modules(root)


def sampler_classes_outside_sampler_modules(root: Path) -> list[str]:
    """``path:line: class`` for each ``*Sampler`` class in datamodules that no sampler rule sees."""
    mods = _load_cached(root) if root == REPO else load_modules(root)
    out = []
    for name, mod in mods.items():
        if not name.startswith("datamodules") or _in_scope(name, SAMPLER_MODULES):
            continue
        out += [f"{_rel(mod.path, root)}:{n.lineno}: class {n.name}" for n in ast.walk(mod.tree)
                if isinstance(n, ast.ClassDef) and fnmatch.fnmatchcase(n.name, SAMPLER_CLASS)]
    return out


def _explain(rule: Rule, violations: list[Violation]) -> str:
    lines = "\n".join(f"  {v}" for v in violations)
    return f"rule {rule.name} broken:\n{lines}\nwhy: {rule.reason}"


# --------------------------------------------------------------------------------------------- the tests
def _rule_param(rule: Rule):
    return pytest.param(rule, id=rule.name)


@pytest.mark.parametrize("rule", [_rule_param(r) for r in RULES])
def test_rule_holds(rule):
    violations = check(REPO, (rule,))
    assert not violations, _explain(rule, violations)


def test_rules_cover_modules_that_exist():
    """A rule whose scope matches nothing (a package renamed) would pass silently."""
    mods = _load_cached(REPO)
    for rule in RULES:
        assert any(_in_scope(n, rule.scope) for n in mods), f"rule {rule.name}: no module matches {rule.scope}"
    for prefix in (*LEARNER_SIDE, "imaging_meta.module", "imaging_meta.commands", "imaging_meta.evaluation",
                   "imaging_meta.checkpoint_io", "datamodules.io", "datamodules.transforms"):
        assert any(_under(n, prefix) for n in mods), f"{prefix} no longer exists: update RULES"


def test_samplers_live_where_the_sampler_rule_sees_them():
    stray = sampler_classes_outside_sampler_modules(REPO)
    assert not stray, (
        f"episode samplers outside {SAMPLER_MODULES}, so `samplers_no_pixel_loading` does not check them:\n  "
        + "\n  ".join(stray)
        + "\nmove them into datamodules/sampling/samplers*.py (and their pixel work into a dataset module)"
    )


# ------------------------------------------------------------------------------- a test of the checker
PLANTED = {
    "imaging_meta/__init__.py": "",
    "imaging_meta/episode.py": "import torch\n",
    "imaging_meta/tasks.py": "def get(kind):\n    return kind == 'segmentation'\n",
    "imaging_meta/helper.py": "import pytorch_lightning\n",
    "imaging_meta/module.py": (
        "from lightning.pytorch import LightningModule\n"
        "def metric(task):\n"
        "    if task in ('segmentation', 'classification'):\n"
        "        return 1\n"
        "    match task:\n"
        "        case 'classification':\n"
        "            return 2\n"
    ),
    "imaging_meta/backbones.py": "from imaging_meta import pretrained\ndef load(p):\n    return open(p).read()\n",
    "imaging_meta/pretrained.py": "import urllib.request\n",  # exempt, and its imports are not followed
    "imaging_meta/fetcher.py": "import urllib.request\n",
    "imaging_meta/learners/__init__.py": "",
    "imaging_meta/learners/bad.py": (
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "import lightning.pytorch as pl\n"
        "from .. import helper\n"
        "from imaging_meta.episode import Episode\n"
        "if TYPE_CHECKING:\n"
        "    from imaging_meta.module import Ignored\n"
        "def save(path, net):\n"
        "    from datamodules.sampling import samplers\n"
        "    torch.save(net.state_dict(), path)\n"
        "    path.write_text('x')\n"
        "    with open(path) as f:\n"
        "        return f.read()\n"
    ),
    "datamodules/__init__.py": "",
    "datamodules/io/__init__.py": "",
    "datamodules/io/atomic.py": "import os\n",
    "datamodules/io/dicom.py": "import pydicom\n",
    "datamodules/sampling/__init__.py": "",
    "datamodules/sampling/samplers.py": (
        "from ..io import atomic\n"
        "from ..io.dicom import read\n"
        "import monai.transforms\n"
        "from imaging_meta.episode import Episode\n"
        "from imaging_meta.module import EpisodicModule\n"
    ),
    "datamodules/sampling/mixed.py": "class MixedEpisodeSampler:\n    pass\n",
}


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_checker_reports_planted_violations(tmp_path):
    found = {(v.rule, v.module, v.what) for v in check(_plant(tmp_path, PLANTED))}
    expected = {
        ("learners_no_lightning_data_or_app", "imaging_meta.learners.bad", "imports lightning.pytorch"),
        ("learners_no_lightning_data_or_app", "imaging_meta.learners.bad", "imports datamodules.sampling.samplers"),
        # transitive: learners.bad -> helper -> pytorch_lightning (the TYPE_CHECKING import does not count)
        ("learners_no_lightning_data_or_app", "imaging_meta.helper", "imports pytorch_lightning"),
        ("learners_no_file_io", "imaging_meta.learners.bad", "torch.save(...)"),
        ("learners_no_file_io", "imaging_meta.learners.bad", "path.write_text(...)"),
        ("learners_no_file_io", "imaging_meta.learners.bad", "open(...)"),
        ("learners_no_file_io", "imaging_meta.backbones", "open(...)"),  # the whole learner side (a review)
        ("no_network_outside_pretrained", "imaging_meta.fetcher", "imports urllib.request"),
        ("datamodules_only_episode_from_imaging_meta", "datamodules.sampling.samplers", "imports imaging_meta.module"),
        ("samplers_no_pixel_loading", "datamodules.sampling.samplers", "imports datamodules.io.dicom"),
        ("samplers_no_pixel_loading", "datamodules.sampling.samplers", "imports monai.transforms"),
        ("no_pytorch_lightning", "imaging_meta.helper", "imports pytorch_lightning"),
        ("task_kind_strings_only_in_tasks", "imaging_meta.module",
         "compares with a task-kind string: task in ('segmentation', 'classification')"),
        ("task_kind_strings_only_in_tasks", "imaging_meta.module", "matches a task-kind string: case 'classification'"),
    }
    assert found == expected, (sorted(found - expected), sorted(expected - found))
    # the transitive ones name their chain
    via = {v.module: v.via for v in check(tmp_path) if v.rule == "learners_no_lightning_data_or_app"}
    assert via["imaging_meta.helper"] == ("imaging_meta.learners.bad", "imaging_meta.helper")
    assert sampler_classes_outside_sampler_modules(tmp_path) == [
        "datamodules/sampling/mixed.py:1: class MixedEpisodeSampler"
    ]


def test_checker_passes_a_clean_tree(tmp_path):
    clean = {
        "imaging_meta/__init__.py": "",
        "imaging_meta/episode.py": "import torch\n",
        "imaging_meta/tasks.py": "KIND = 'segmentation'\ndef seg(k):\n    return k == 'segmentation'\n",
        "imaging_meta/module.py": "import lightning.pytorch\nfrom imaging_meta.learners.good import Good\n",
        "imaging_meta/learners/__init__.py": "",
        "imaging_meta/learners/good.py": (
            "import torch\nfrom ..episode import Episode\n"
            "class Good(torch.nn.Module):\n    task = 'classification'\n"  # naming a kind is fine, switching on it is not
            "    def loss(self, x):\n        return x.sum()\n"
        ),
        "datamodules/__init__.py": "",
        "datamodules/io/__init__.py": "",
        "datamodules/io/atomic.py": "import os\n",
        "datamodules/sampling/__init__.py": "",
        "datamodules/sampling/samplers.py": (
            "import numpy as np\nfrom datamodules.io.atomic import atomic_open\nfrom imaging_meta.episode import Episode\n"
            "class EpisodeSampler:\n    pass\n"
        ),
    }
    assert check(_plant(tmp_path, clean)) == []
    assert sampler_classes_outside_sampler_modules(tmp_path) == []
