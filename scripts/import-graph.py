#!/usr/bin/env python3
"""Reads the `use crate::…`, `super::…` and `self::…` paths of src/ and checks that no files
import each other in a loop, and that every module imports only the layers below it
(docs/DESIGN.md, "Layers").

Each file is a node. An arrow A -> B means that A names an item of B: a `use` line, or a
path written inline (`crate::store::ChunkId`), resolved to the file that holds the module
it ends in. A parent's `mod` line is not an arrow, nor is a module's own inline
`mod tests { use super::*; }` (it stays inside its file). A `pub use` re-export in a parent
is an arrow to the child, like any other use.

  scripts/import-graph.py             exit 1 and list every cycle and every import against
                                      the layers; exit 0 when there is none
  scripts/import-graph.py --edges     also print every arrow with the names it takes
  scripts/import-graph.py --layers    print the files floor by floor (floor 1 imports nothing)

Only the standard library is used; no cargo, no network.
"""

import os
import re
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "src")

# The layers of docs/DESIGN.md, bottom first, by module (a folder or file under src/). A
# module may import any module of a lower layer; inside its layer only the pairs of WITHIN
# (importer, imported).
LAYERS = [
    ["util"],
    ["formats", "config"],
    ["arch", "store", "image", "api"],
    ["vstate", "disk"],
    ["devices"],
    ["snapshot"],
    ["repo"],
    ["vmm"],
    ["builder"],
    ["archive"],
    ["fuzzing"],
    ["main"],
]
WITHIN = {("image", "store")}


def strip_comments_and_strings(text):
    """Blanks out comments, string and char literals, keeping newlines and offsets."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i]):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{..}'); otherwise a lifetime or label.
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def find_modules():
    """Maps module paths (tuples, () = crate root) to files, following `mod` lines."""
    modules = {}  # (crate, path tuple) -> file
    files = {}  # file -> (crate, path tuple)

    def visit(crate, path, file, dir_for_children):
        modules[(crate, path)] = file
        files[file] = (crate, path)
        text = strip_comments_and_strings(open(file, encoding="utf-8").read())
        raw = open(file, encoding="utf-8").read()
        for m in re.finditer(r"(?m)^[ \t]*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text):
            name = m.group(1)
            # A #[path = "..."] attribute just above the mod line.
            before = raw[: m.start()].rstrip().splitlines()[-3:]
            attr = None
            for line in before:
                pm = re.search(r'#\[path\s*=\s*"([^"]+)"\]', line)
                if pm:
                    attr = pm.group(1)
            if attr:
                child = os.path.normpath(os.path.join(os.path.dirname(file), attr))
                child_dir = os.path.join(os.path.dirname(child), name)
            else:
                cand = [
                    os.path.join(dir_for_children, name + ".rs"),
                    os.path.join(dir_for_children, name, "mod.rs"),
                ]
                child = next((c for c in cand if os.path.exists(c)), None)
                if child is None:
                    continue
                child_dir = os.path.join(dir_for_children, name)
            visit(crate, path + (name,), child, child_dir)

    visit("lib", (), os.path.join(SRC, "lib.rs"), SRC)
    if os.path.exists(os.path.join(SRC, "main.rs")):
        visit("bin", (), os.path.join(SRC, "main.rs"), SRC)
    return modules, files


def expand_use_tree(tree):
    """`a::{b, c::{d as e}, self}` -> [([a, b], b), ([a, c, d], e), ([a], a)]: each path
    with the name it is known by."""
    tree = re.sub(r"\s+as\s+", " as ", tree.strip())
    tree = re.sub(r"\s*(::|,|\{|\})\s*", r"\1", tree)

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts

    def walk(s, prefix):
        if "{" in s:
            head, _, rest = s.partition("{")
            body = rest[: rest.rfind("}")]
            head_segs = [x for x in head.split("::") if x]
            result = []
            for part in split_top(body):
                result += walk(part, prefix + head_segs)
            return result
        alias = None
        if " as " in s:
            s, _, alias = s.partition(" as ")
        segs = prefix + [x for x in s.split("::") if x]
        if segs and segs[-1] == "self":
            segs = segs[:-1]
        if not segs:
            return []
        return [(segs, alias or segs[-1])]

    return walk(tree, [])


USE_RE = re.compile(r"(?<![\w:])(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")
# A path written inline: `crate::a::B`, `super::x`, `child::f`, `Alias::g`, ...
PATH_RE = re.compile(r"(?<![\w:$.])([A-Za-z_]\w*(?:::\w+)+)")


def inline_mod_spans(text):
    """[(start, end, name)] of inline `mod name { ... }` blocks."""
    spans = []
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        depth, j = 1, m.end()
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        spans.append((m.start(), j, m.group(1)))
    return spans


def module_at(base, spans, pos):
    path = base
    for start, end, name in spans:
        if start <= pos < end:
            path = path + (name,)
    return path


def resolve(segs, here, crate, modules):
    """Absolute module path of a `use`/inline path seen in module `here`, or None."""
    if not segs:
        return None
    if segs[0] == "crate":
        abs_path = list(segs[1:])
    elif segs[0] in ("super", "self"):
        cur = list(here)
        i = 0
        while i < len(segs) and segs[i] in ("super", "self"):
            if segs[i] == "super":
                cur = cur[:-1]
            i += 1
        abs_path = cur + list(segs[i:])
    elif crate == "bin" and segs[0] == "vmm":
        return ("lib", tuple(segs[1:]))
    elif (crate, tuple(here) + (segs[0],)) in modules:
        abs_path = list(here) + list(segs)
    else:
        return None
    return (crate, tuple(abs_path))


def longest_module(target, modules, reexports):
    """(module, rest of the path) that a path names, following `pub use` re-exports to
    the file that defines the item."""
    crate, path = target
    for _ in range(16):
        for k in range(len(path), -1, -1):
            if (crate, path[:k]) in modules:
                mod, rest = (crate, path[:k]), path[k:]
                break
        else:
            return None, ()
        hop = reexports.get(mod, {}).get(rest[0]) if rest else None
        if hop is None:
            return mod, rest
        crate, path = hop[0], hop[1] + rest[1:]
    return mod, rest


def build_graph():
    modules, files = find_modules()
    texts = {f: strip_comments_and_strings(open(f, encoding="utf-8").read()) for f in files}
    # Pass 1: what each module hands on with `pub use` (a face: no arrow of its own).
    reexports = defaultdict(dict)
    for file, (crate, base) in files.items():
        spans = inline_mod_spans(texts[file])
        for m in USE_RE.finditer(texts[file]):
            if not m.group(1):
                continue
            here = module_at(base, spans, m.start())
            for segs, name in expand_use_tree(m.group(2)):
                target = resolve(segs, here, crate, modules)
                if target is not None and segs[-1] != "*":
                    reexports[(crate, tuple(here))][name] = target
    # Pass 2: the arrows.
    edges = defaultdict(set)  # (from file, to file) -> names
    for file, (crate, base) in files.items():
        text = texts[file]
        spans = inline_mod_spans(text)
        refs = []
        used = []
        for m in USE_RE.finditer(text):
            used.append((m.start(), m.end()))
            if m.group(1):
                continue
            here = module_at(base, spans, m.start())
            for segs, _ in expand_use_tree(m.group(2)):
                refs.append((segs, here))
        # Names this file brings into scope with `use`: a path through one of them
        # (`msrs::readable_msrs` after `use crate::arch::x86_64::msrs`) is followed too.
        aliases = {}
        for m in USE_RE.finditer(text):
            here = module_at(base, spans, m.start())
            for segs, name in expand_use_tree(m.group(2)):
                target = resolve(segs, here, crate, modules)
                if target is not None and segs[-1] != "*":
                    aliases[name] = target
        for m in PATH_RE.finditer(text):
            if any(s <= m.start() < e for s, e in used):
                continue
            here = module_at(base, spans, m.start())
            segs = m.group(1).split("::")
            if segs[0] in ("crate", "super", "self"):
                refs.append((segs, here))
            elif segs[0] in aliases:
                crate_t, path_t = aliases[segs[0]]
                refs.append((["crate", *path_t, *segs[1:]], here) if crate_t == crate else ([], here))
            elif (crate, tuple(here) + (segs[0],)) in modules:
                refs.append((["self", *segs], here))
        for segs, here in refs:
            target = resolve(segs, here, crate, modules)
            if target is None:
                continue
            mod, rest = longest_module(target, modules, reexports)
            if mod is None:
                continue
            to = modules[mod]
            if to == file or mod[1] == ():
                continue
            name = rest[0] if rest else mod[1][-1]
            edges[(file, to)].add(name)
    return files, edges


def cycles(nodes, edges):
    """Strongly connected components of more than one file (Tarjan)."""
    succ = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return out


def floors(nodes, edges):
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    floor = {}

    def f(v, seen=()):
        if v in floor:
            return floor[v]
        if v in seen:
            return 0
        floor[v] = 1 + max((f(w, seen + (v,)) for w in succ[v]), default=0)
        return floor[v]

    for v in nodes:
        f(v)
    return floor


def module_of(path):
    """`src/disk/http.rs` -> `disk`, `src/builder.rs` -> `builder`."""
    first = os.path.relpath(path, SRC).split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def layer_violations(files, edges):
    """Arrows between modules that the layers do not allow, and files of no layer."""
    layer = {m: i for i, ms in enumerate(LAYERS) for m in ms}
    bad = []
    for f in sorted(files):
        m = module_of(f)
        if m != "lib" and m not in layer:
            bad.append(f"{os.path.relpath(f, ROOT)}: module {m} is in no layer (LAYERS)")
    for (a, b), names in sorted(edges.items()):
        ma, mb = module_of(a), module_of(b)
        if ma == mb or ma not in layer or mb not in layer:
            continue
        if layer[ma] > layer[mb] or (ma, mb) in WITHIN:
            continue
        bad.append(
            f"{os.path.relpath(a, ROOT)} -> {os.path.relpath(b, ROOT)}: {', '.join(sorted(names))}"
            f" ({ma} may not import {mb})"
        )
    return bad


def main():
    files, edges = build_graph()
    rel = lambda p: os.path.relpath(p, ROOT)
    if "--edges" in sys.argv:
        for (a, b), names in sorted(edges.items()):
            print(f"{rel(a)} -> {rel(b)}: {', '.join(sorted(names))}")
    if "--layers" in sys.argv:
        fl = floors(files, edges)
        for n in sorted(set(fl.values()), reverse=True):
            print(f"floor {n}: " + " ".join(sorted(rel(v) for v in fl if fl[v] == n)))
    found = cycles(files, edges)
    for i, comp in enumerate(found, 1):
        members = set(comp)
        print(f"cycle {i}: {len(comp)} files")
        for (a, b), names in sorted(edges.items()):
            if a in members and b in members:
                print(f"  {rel(a)} -> {rel(b)}: {', '.join(sorted(names))}")
    against = layer_violations(files, edges)
    for line in against:
        print(f"against the layers: {line}")
    if not found and not against:
        print(f"import-graph: {len(files)} files, {len(edges)} arrows, no cycle, layers kept")
        return 0
    print(
        f"import-graph: {len(found)} cycle(s) among the files of src/, "
        f"{len(against)} import(s) against the layers (docs/DESIGN.md)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
