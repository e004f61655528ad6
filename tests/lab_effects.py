"""
The figures of LAB.md: each recipe applied as a student applies it (tests/test_lab.py's parser and copy),
its commands run at seeds 0, 1 and 2, and the same commands on the unchanged code as the baseline; prints
the mean SRCC of every run over the seeds with the lowest and highest seed. Needs the demo's results
(`bash run_all.sh --demo`, results/demo); writes under results/lab-effects/.

    python tests/lab_effects.py            # every recipe, about 15 minutes on 2 CPU cores
    python tests/lab_effects.py 7 8        # some of them
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
from conftest import student_copy  # noqa: E402 (needs the path above)
from test_lab import HACKS  # noqa: E402

# the baseline of a recipe is its own commands on the unchanged code, except where the recipe is a row
# or a flag that the unchanged code compares with another run
BASELINES = {
    4: "python regress.py --strategy 1 --modality text --data results/demo/data --checkpoint "
       "results/demo/models/distilbert --out results/lab/base-s1-text --epochs 60 --patience-start 15 "
       "--patience 10 --lr 1e-3 --batch-size 64",
    6: "python regress.py --strategy 3 --modality vision --data results/demo/data --checkpoint "
       "results/demo/models/clip --out results/lab/base-s3-vision --epochs 60 --patience-start 15 "
       "--patience 10 --lr 1e-3 --batch-size 64",
}


def seeded(block, seed, where):
    """the recipe's bash block with --seed on every training command and every output under `where`"""
    block = block.replace('\\\n', ' ')
    block = re.sub(r'(python (?:regress|contrastive)\.py [^\n;]*)', rf'\1 --seed {seed}', block)
    block = block.replace('results/lab/', f'{where}/').replace('results/demo/s7-text', f'{where}/s7-text')
    return block.replace('python evaluate.py results/demo', 'true')  # the tables are not measured


def run(repo, block, log):
    """the block in the copy `repo`, whose results/ is the repository's; -> seconds"""
    t0 = time.time()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    r = subprocess.run(['bash', '-euo', 'pipefail', '-c', block], cwd=repo, env=env, capture_output=True,
                       text=True)
    log.write(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"failed in {repo}:\n{block}\n{r.stderr[-3000:]}")
    return time.time() - t0


def srccs(block, root):
    """{run name: srcc_mean} of the regress.py runs a block wrote"""
    outs = re.findall(r'--out (\S+)', block)
    found = {}
    for out in outs:
        for m in ('vision', 'text'):  # a `for m in vision text` loop writes both
            path = os.path.join(root, out.replace('$m', m), 'results.json')
            if os.path.exists(path):
                with open(path) as f:
                    run = json.load(f)
                if run['kind'] == 'regress':  # contrastive.py's FCLIP has no SRCC
                    found[os.path.basename(out.replace('$m', m))] = run['srcc_mean']
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('hacks', nargs='*', type=int, default=sorted(HACKS), help="recipe numbers")
    args = p.parse_args()
    if not os.path.exists(os.path.join(ROOT, 'results', 'demo', 'data')):
        raise SystemExit("run `bash run_all.sh --demo` first: the recipes start from results/demo")
    work = os.path.join(ROOT, 'results', 'lab-effects')
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, 'log.txt'), 'a')
    for n in args.hacks:
        changes, block = HACKS[n]
        sides = {'recipe': (student_copy(os.path.join(work, f'repo{n}'), changes), block),
                 'baseline': (student_copy(os.path.join(work, 'repo-unchanged'), {}), BASELINES.get(n, block))}
        figures, seconds = {}, {}
        for side, (repo, commands) in sides.items():
            if not os.path.exists(os.path.join(repo, 'results')):
                os.symlink(os.path.join(ROOT, 'results'), os.path.join(repo, 'results'))
            for seed in (0, 1, 2):
                where = f'results/lab-effects/{n}-{side}-seed{seed}'
                shutil.rmtree(os.path.join(ROOT, where), ignore_errors=True)
                seconds.setdefault(side, run(repo, seeded(commands, seed, where), log))
                for name, r in srccs(seeded(commands, seed, where), ROOT).items():
                    figures.setdefault((side, name.replace('base-', '')), []).append(r)
        print(f"recipe {n} (one run of the commands: {seconds['recipe']:.0f} s; the baseline's "
              f"{seconds['baseline']:.0f} s)")
        for (side, name), values in sorted(figures.items()):
            seeds = ' '.join(f'{v:.3f}' for v in values)
            print(f"  {side:8s} {name:24s} {statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"
                  f"  seeds {seeds}", flush=True)


if __name__ == '__main__':
    main()
