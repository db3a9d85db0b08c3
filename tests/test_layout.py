"""The house's arrows point one way: no entry point imports another, and training does not load the evaluator."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train", "sample", "metrics", "tools.caption", "tools.prepare_data", "tools.domain"}
RUNS = {"train", "sample"}  # the entry points that train or sample: not even a benchmark imports them


def imported_modules(path: Path) -> set:
    """The dotted names a file imports (`from pkg import mod` counts as pkg.mod too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_entry_point_imports_another():
    """What two entry points share lives in a module; bench/ may use the evaluation commands' functions (metrics,
    tools.domain) but never imports train.py or sample.py."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or "venv" in rel.parts:
            continue
        forbidden = RUNS if rel.parts[0] == "bench" else ENTRY_POINTS
        me = ".".join(rel.with_suffix("").parts)
        assert not (imported_modules(path) & (forbidden - {me})), f"{rel} imports {imported_modules(path) & forbidden}"


def test_training_does_not_load_the_fid_evaluator():
    """train.py takes its validation PSNR from evaluator.measures, without the Inception, its weight reader or the
    .npz batches."""
    code = ("import sys, train; print(sorted(m for m in sys.modules if m.startswith('evaluator.') "
            "or m in ('metrics', 'inception', 'npz_batch', 'torchscript_weights')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['evaluator.measures']", out
