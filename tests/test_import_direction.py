"""Lower layers never import higher ones: no module of model/, data/, kernels/, parallel/, checkpoint/ (nor
the shared leaf modules errors, fileio, manifest, cli) imports training/, hf/, research/ or planning/ --
at the top or inside a function. Found by parsing every module's source (ast), so a new file is covered."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mixln"
LOWER = ("model", "data", "kernels", "parallel", "checkpoint", "errors.py", "fileio.py", "manifest.py", "cli.py")
HIGHER = ("training", "hf", "research", "planning")


def _imports(path: Path, root: Path = PACKAGE.parent):
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    package = path.relative_to(root).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            for alias in node.names:  # `from megatron_mixln import training` imports a package too
                yield node.lineno, f"{module}.{alias.name}"


def _lower_files():
    for name in LOWER:
        target = PACKAGE / name
        yield from sorted(target.rglob("*.py")) if target.is_dir() else [target]


def test_lower_layers_do_not_import_higher_ones():
    checked, bad = 0, []
    for path in _lower_files():
        checked += 1
        for line, module in _imports(path):
            top = module.split(".")
            if top[0] == "megatron_mixln" and len(top) > 1 and top[1] in HIGHER:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert checked > 40, checked
    assert not bad, "\n".join(bad)


def test_the_check_sees_relative_and_function_local_imports(tmp_path):
    """`from ..training import trainer` inside a function of megatron_mixln/model/ is megatron_mixln.training.trainer."""
    probe = tmp_path / "megatron_mixln" / "model" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ..training import trainer\n    from . import block\n")
    assert list(_imports(probe, tmp_path)) == [(2, "megatron_mixln.training.trainer"), (3, "megatron_mixln.model.block")]
