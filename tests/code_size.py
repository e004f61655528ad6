"""
How big the repository's code is, by the measures the house style sets (a student reads each file in one
sitting): every .py outside tests/ (the top-level scripts, harness/, tools/), its lines, the share of non-blank
lines over 100 characters, the longest functions and the functions with more than 8 parameters; the total, and
the total of the five lesson files (models, data, contrastive, regress, evaluate).

    python tests/code_size.py            # a table per file, then the longest functions
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSON = ('models.py', 'data.py', 'contrastive.py', 'regress.py', 'evaluate.py')  # the paper, read whole


def sources():
    """every .py of the repository but the tests': the top level and each folder one level down (harness/, tools/),
    hidden folders (.venv) left out"""
    paths = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, '*', '*.py'))
    rel = [os.path.relpath(p, ROOT) for p in paths]
    return sorted(r for r in rel if not r.startswith(('tests' + os.sep, '.')))


def functions(tree):
    """-> [(qualified name, lines, parameters)] of every function and method in the module"""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                params = len(a.posonlyargs + a.args + a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                params -= bool(a.args) and a.args[0].arg in ('self', 'cls')
                found.append((prefix + child.name, child.end_lineno - child.lineno + 1, params))
                visit(child, prefix + child.name + '.')
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + '.')
    visit(tree, '')
    return found


def main():
    rows, every = [], []
    for name in sources():
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        lines = text.splitlines()
        filled = [line for line in lines if line.strip()]
        long = sum(len(line) > 100 for line in filled)
        fns = functions(ast.parse(text))
        every += [(name, *f) for f in fns]
        rows.append((name, len(lines), long / max(len(filled), 1), max((f[1] for f in fns), default=0),
                     max((f[2] for f in fns), default=0)))
    print(f"{'file':24s} {'lines':>6s} {'>100 chars':>11s} {'longest fn':>11s} {'most params':>12s}")
    for name, n, share, longest, params in rows:
        print(f"{name:24s} {n:6d} {share:10.1%} {longest:11d} {params:12d}")
    lesson = [r for r in rows if r[0] in LESSON]
    print(f"{f'all ({len(rows)} files)':24s} {sum(r[1] for r in rows):6d}")
    print(f"{f'lesson ({len(lesson)} files)':24s} {sum(r[1] for r in lesson):6d}  {', '.join(LESSON)}")
    missing = set(LESSON) - {r[0] for r in lesson}
    if missing:
        print(f"  (not found: {', '.join(sorted(missing))})")
    print("\nlongest functions:")
    for name, fn, n, params in sorted(every, key=lambda f: -f[2])[:8]:
        print(f"  {name}:{fn} {n} lines, {params} parameters")
    over = [f"{name}:{fn} ({params})" for name, fn, n, params in every if params > 8]
    print(f"\nfunctions with more than 8 parameters: {', '.join(over) or 'none'}")


if __name__ == '__main__':
    main()
