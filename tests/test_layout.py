"""The package layout: no import cycles between modules (top-level or inside functions), and
the tree's subpackages are the pipeline's stages."""
import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tracer"


def _modules():
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["agenttrace"] + parts)] = p
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = collections.defaultdict(set)
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agenttrace"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        graph[m].add(f"{node.module}.{a.name}")
                if node.module in mods and node.module != "agenttrace":
                    graph[m].add(node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    # a module importing its own package's __init__ (re-exports) is not a cycle of the code
    cycles, state = [], {}

    def visit(v, path):
        state[v] = 1
        for w in graph.get(v, ()):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2
    for v in sorted(mods):
        if v not in state:
            visit(v, [v])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_subpackages_are_the_stages():
    subs = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert {"kernel", "decode", "enrich", "match", "act", "sinks", "session", "cli"} <= subs
