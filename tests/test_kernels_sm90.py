"""The Triton kernels of ``kernels/`` as the H200 compiles them, and the package's place at the
bottom of the import graph."""
import ast
import pathlib
import sys

KERNELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"


# ---- kernels/ imports nothing from ibot_fast --------------------------------------------------
def _imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""


def test_kernels_import_nothing_from_ibot_fast():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert {"__init__.py", "soft_ce.py", "soft_ce_triton.py", "ema_triton.py"} <= \
        {f.name for f in files}
    upward = {f.name: m for f in files for m in _imported_modules(f)
              if m == "ibot_fast" or m.startswith("ibot_fast.")}
    assert not upward, f"kernels/ must stay at the bottom of the import graph: {upward}"


def test_package_attribute_is_the_function_not_the_submodule():
    import ibot_fast.fused_loss as fl
    import ibot_fast.kernels
    from ibot_fast.kernels import soft_ce, soft_ce_linear, teacher_col_sum
    from ibot_fast.kernels.soft_ce import soft_ce as op  # loads the submodule (already loaded)
    module = sys.modules["ibot_fast.kernels.soft_ce"]
    assert callable(ibot_fast.kernels.soft_ce) and ibot_fast.kernels.soft_ce is op is soft_ce
    assert module.soft_ce is soft_ce and module.soft_ce_linear is soft_ce_linear
    assert (fl.soft_ce, fl.soft_ce_linear, fl.teacher_col_sum) == \
        (soft_ce, soft_ce_linear, teacher_col_sum)
