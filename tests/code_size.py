"""
How big the repository's top-level scripts are, by the measures the house style sets (a student reads each file
in one sitting): lines per file, the share of non-blank lines over 100 characters, the longest functions and the
functions with more than 8 parameters.

    python tests/code_size.py            # a table per file, then the longest functions
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    for path in sorted(glob.glob(os.path.join(ROOT, '*.py'))):
        name = os.path.basename(path)
        with open(path) as f:
            text = f.read()
        lines = text.splitlines()
        filled = [line for line in lines if line.strip()]
        long = sum(len(line) > 100 for line in filled)
        fns = functions(ast.parse(text))
        every += [(name, *f) for f in fns]
        rows.append((name, len(lines), long / max(len(filled), 1), max((f[1] for f in fns), default=0),
                     max((f[2] for f in fns), default=0)))
    print(f"{'file':16s} {'lines':>6s} {'>100 chars':>11s} {'longest fn':>11s} {'most params':>12s}")
    for name, n, share, longest, params in rows:
        print(f"{name:16s} {n:6d} {share:10.1%} {longest:11d} {params:12d}")
    total = sum(r[1] for r in rows)
    print(f"{'all':16s} {total:6d}")
    print("\nlongest functions:")
    for name, fn, n, params in sorted(every, key=lambda f: -f[2])[:8]:
        print(f"  {name}:{fn} {n} lines, {params} parameters")
    over = [f"{name}:{fn} ({params})" for name, fn, n, params in every if params > 8]
    print(f"\nfunctions with more than 8 parameters: {', '.join(over) or 'none'}")


if __name__ == '__main__':
    main()
