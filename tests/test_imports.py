"""reid_tf's imports form no cycle (issue 40), counting the imports inside functions: an import
hidden in a function to dodge a cycle is still a cycle."""

import ast
import os

import reid_tf

PACKAGE = os.path.dirname(reid_tf.__file__)
ROOT = os.path.dirname(PACKAGE)


def module_files():
    """{module name: path} of every module of reid_tf."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(path, name, modules):
    """The reid_tf modules that the module at `path` imports, anywhere in it."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_walk_sees_imports_inside_functions():
    modules = module_files()
    graph = {name: imports_of(path, name, modules) for name, path in modules.items()}
    # reid-serve's main imports the server inside the function (fast --help): still an edge.
    assert "reid_tf.deploy.serving.server" in graph["reid_tf.cli.serve"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_reid_tf_has_no_import_cycle():
    modules = module_files()
    graph = {name: imports_of(path, name, modules) for name, path in modules.items()}
    assert cycles(graph) == []
