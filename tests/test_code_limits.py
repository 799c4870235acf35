"""The structural limits of reid_tf (issue 40): no function over 80 lines and none taking over
10 parameters, Keras layer and model constructors excepted (their arguments are their
serialised config)."""

import ast
import pathlib

import reid_tf

PACKAGE = pathlib.Path(reid_tf.__file__).parent
MAX_LINES, MAX_PARAMETERS = 80, 10


def functions():
    """`(where, function node, enclosing class node or None)` of every function in reid_tf."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in [None, *[n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]]:
            body = tree.body if cls is None else cls.body
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node, cls
    # Functions nested in functions are counted in their enclosing function's lines.


def parameters(node):
    a = node.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    count = len(names) + bool(a.vararg) + bool(a.kwarg)
    return count - bool(names and names[0].arg in ("self", "cls"))


def is_keras_constructor(node, cls):
    bases = [ast.unparse(base) for base in cls.bases] if cls is not None else []
    return node.name == "__init__" and any("Layer" in b or "Model" in b for b in bases)


def test_no_function_is_over_80_lines():
    long = [f"{where}: {node.end_lineno - node.lineno + 1} lines" for where, node, _ in functions()
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long


def test_no_function_takes_over_10_parameters():
    wide = [f"{where}: {parameters(node)}" for where, node, cls in functions()
            if parameters(node) > MAX_PARAMETERS and not is_keras_constructor(node, cls)]
    assert not wide, wide


def test_the_checks_can_fail():
    source = "def f(" + ", ".join(f"a{i}" for i in range(11)) + "):\n" + "    x = 1\n" * 81
    node = ast.parse(source).body[0]
    assert parameters(node) == 11 and node.end_lineno - node.lineno + 1 == 82
    layer = ast.parse("class L(keras.layers.Layer):\n    def __init__(self, a):\n        pass\n")
    assert is_keras_constructor(layer.body[0].body[0], layer.body[0])
