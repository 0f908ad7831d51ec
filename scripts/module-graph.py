#!/usr/bin/env python3
"""module-graph.py: the crate's module dependency graph, from its `use` paths
(`crate::`, `super::`, `self::`), and whether it has a cycle.

  scripts/module-graph.py          # cycles between modules (file level)
  scripts/module-graph.py --top    # the same with each top-level module as one node
  scripts/module-graph.py --edges  # also print every edge

A parent using its own child (and a child its parent) is not an edge: that is
how a module is made of files. Unit tests (`mod tests`) are left out. Exits 1
if there is a cycle. A text scan, not a compiler: paths brought in by a glob
or a macro are not seen (the crate uses neither for its own modules).
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
top = "--top" in sys.argv

mods = {}
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if f.endswith(".rs"):
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            mods["::".join(rel) or "crate"] = open(os.path.join(dirpath, f)).read()


def resolve(cur, path):
    parts = path.split("::")
    base = [] if cur == "crate" else cur.split("::")
    if parts[0] == "crate":
        out, parts = [], parts[1:]
    elif parts[0] == "super":
        out, parts = base[:-1], parts[1:]
    else:  # self
        out, parts = base, parts[1:]
    while parts and parts[0] == "super":
        out, parts = out[:-1], parts[1:]
    for i in range(len(parts), -1, -1):
        cand = "::".join(out + parts[:i]) or "crate"
        if cand in mods:
            return cand
    return None


def node(m):
    return m.split("::")[0] if top else m


edges = {}
for m, src in mods.items():
    body = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", src, flags=re.S)
    edges.setdefault(node(m), set())
    paths = re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", body)
    # Grouped imports: `use super::{classic, meta};` names each module.
    for prefix, group in re.findall(r"\b((?:crate|super|self)(?:::\w+)*)::\{([^}]*)\}", body):
        paths += [f"{prefix}::{name.strip().split(' ')[0]}" for name in group.split(",") if name.strip()]
    for path in paths:
        t = resolve(m, path)
        if not t or t == m or m.startswith(t + "::") or t.startswith(m + "::"):
            continue
        if node(t) != node(m):
            edges[node(m)].add(node(t))

# Tarjan's strongly connected components: any with two nodes or more is a cycle.
index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            cycles.append(sorted(comp))


for v in list(edges):
    if v not in index:
        visit(v)
if "--edges" in sys.argv:
    for k in sorted(edges):
        print(f"{k} -> {', '.join(sorted(edges[k])) or '-'}")
print("cycles:", cycles if cycles else "none")
sys.exit(1 if cycles else 0)
