"""The package's layout holds: acip_core's packages import only the ones below them and no module
cycles (the .importlinter contract, docs/ARCHITECTURE.md "Layout"), the library never imports
gradio, and the app calls only acip_core's verbs and its serving layer."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contract_is_kept():
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
                          "--no-cache", "--config", str(ROOT / ".importlinter")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_the_library_never_imports_gradio():
    code = "import sys, acip_core, acip_core.cli, acip_core.serving.studio; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# The app (app.py, app_handlers.py, app_uploads.py, app_queue.py) may import acip_core's public verbs
# (acip_core/__init__.py) and the serving layer (acip_core.serving: the Studio's verbs, the Explorer,
# public mode), never a layer below it directly. One exception: acip_core.evaluation.plots, the figures
# of a curve and of a run (a view of evaluation results with no serving state; benchmarks draw them
# too). import-linter takes packages only (root_packages refuses top-level modules), so this contract
# is read from the app's source here.
APP_MAY_IMPORT = ("acip_core", "acip_core.serving", "acip_core.evaluation.plots")


def library_imports_outside_the_app_contract(source: str) -> list[str]:
    """The acip_core modules a source imports (at the top or inside functions) that the app may not."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from acip_core.evaluation import plots` imports the module acip_core.evaluation.plots
            modules = [f"{node.module}.{a.name}" if node.module != "acip_core" else node.module for a in node.names]
        else:
            continue
        for module in modules:
            if module.split(".")[0] != "acip_core":
                continue
            if module == "acip_core" or any(module == m or module.startswith(m + ".") for m in APP_MAY_IMPORT[1:]):
                continue
            found.append(module)
    return found


def test_the_app_imports_only_acip_cores_verbs_and_the_serving_layer():
    sources = sorted(ROOT.glob("app*.py"))
    assert {p.name for p in sources} >= {"app.py", "app_handlers.py", "app_uploads.py", "app_queue.py"}
    outside = {p.name: library_imports_outside_the_app_contract(p.read_text()) for p in sources}
    assert not any(outside.values()), outside


def test_the_app_contract_sees_an_import_from_a_lower_layer():
    source = ("from acip_core import EMBEDDED\nfrom acip_core.serving.studio import Studio\n"
              "from acip_core.evaluation import plots\n"
              "def f():\n    from acip_core.export.push import push_folder\n"
              "    import acip_core.training.plan\n    from acip_core.sources import models\n    import acip_core.export\n")
    assert library_imports_outside_the_app_contract(source) == ["acip_core.export.push.push_folder",
                                                                "acip_core.training.plan",
                                                                "acip_core.sources.models", "acip_core.export"]


def test_the_app_calls_the_studios_verbs_not_its_parts():
    """No handler reaches through the Studio into its jobs or registry, nor into an Explorer's any-size
    model: what it needs is a Studio verb (serving/studio.py)."""
    parts = {"jobs", "registry", "any_size"}
    reached = {p.name: sorted({f"{n.attr} (line {n.lineno})" for n in ast.walk(ast.parse(p.read_text()))
                               if isinstance(n, ast.Attribute) and n.attr in parts})
               for p in sorted(ROOT.glob("app*.py"))}
    assert not any(reached.values()), reached
