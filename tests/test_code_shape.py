"""The library's code stays readable: no function longer than ~80 lines (docstring excluded) unless a comment
on its `def` line or the line above says why (`# long: <reason>`)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_adapt"
LIMIT = 80


def _body_lines(node: ast.FunctionDef) -> int:
    """Lines of `node` from `def` to its last statement, less its docstring."""
    size = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        size -= first.end_lineno - first.lineno + 1
    return size


def test_functions_stay_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > LIMIT:
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                said = " ".join(lines[max(first - 2, 0) : node.lineno])
                if "# long:" not in said:
                    long.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
                    )
    assert not long, "functions over ~80 lines without a '# long: <reason>' comment:\n" + "\n".join(long)
