"""The issue-5 results table and training curves of a tools/distill-table.sh folder (markdown).

Usage: python3 tools/distill_table.py OUTDIR
"""
import json, glob, os, statistics as st
import sys
R = sys.argv[1] if len(sys.argv) > 1 else "runs/table"
TASKS = ['single', 'position', 'two', 'relation', 'counting']

def lane_secs():
    secs = {}
    for f in glob.glob(f'{R}/lane*.log'):
        for line in open(f):
            p = line.split()
            if p[1] == 'end':
                secs[p[2]] = int(p[4].split('=')[1])
    return secs

def row_of(j):
    d = json.load(open(j))
    return [d['tasks'][t]['accuracy'] for t in TASKS] + [d['score'], d['fd']]

def fmt(vals):
    return ' | '.join('%.3f' % v for v in vals)

secs = lane_secs()
rows = [('teacher, 40 steps (CFG 3)', None, f'{R}/ev/teacher-40.json', None),
        ('teacher, 4 steps (CFG 3)', None, f'{R}/ev/teacher-4.json', None),
        ('teacher, 2 steps (CFG 3)', None, f'{R}/ev/teacher-2.json', None)]
runs = [('DMD2, 4 steps (`--no-rl`)', 'dmd2-4', 'k4'), ('AdvDMD, 4 steps', 'advdmd4', 'k4'),
        ('DMD2, 2 steps (`--no-rl`)', 'dmd2-2', 'k2'), ('AdvDMD, 2 steps', 'advdmd2', 'k2'),
        ('AdvDMD, 4 steps, D frozen at 500', 'frozen4', 'k4')]
print('| | seeds | ' + ' | '.join(TASKS) + ' | overall | Shapes-FD | train time |')
print('|---|---|' + '---|' * (len(TASKS) + 3))
for name, _, j, _ in rows:
    print(f'| {name} | – | {fmt(row_of(j))} | – |')
for name, stem, pre in runs:
    js = sorted(glob.glob(f'{R}/ev/{stem}-s?.json'))
    if not js:
        print(f'| {name} | 0 | (not run) |')
        continue
    vals = [row_of(j) for j in js]
    mean = [st.mean(v[i] for v in vals) for i in range(len(vals[0]))]
    seeds = [os.path.basename(j)[len(stem) + 2:-5] for j in js]
    mins = [(secs.get(f'{pre}-s{s}-prefix', 0) + secs.get(f'{stem}-s{s}', 0)) / 60 for s in seeds]
    per_seed = ' / '.join('%.3f' % v[5] for v in vals)
    print(f'| {name} | {len(js)} ({per_seed}) | {fmt(mean)} | {st.mean(mins):.0f} min |')

def curves(stem, seed):
    path = f'{R}/{stem}-s{seed}/metrics.jsonl'
    if not os.path.exists(path):
        return None
    ms = [json.loads(l) for l in open(path)]
    out = []
    for lo in range(0, len(ms), 100):
        w = ms[lo:lo + 100]
        g = [m for m in w if m['generator_step']]
        r = [m['mean_reward'] for m in w if m['rl_step']]
        out.append((lo + len(w), st.mean(m['d_acc_real'] for m in w), st.mean(m['d_acc_fake'] for m in w),
                    st.mean(m['fake_loss'] for m in w), st.mean(m['d_loss'] for m in w),
                    st.mean(m['dmd_grad_norm'] for m in g) if g else float('nan'),
                    st.mean(m['gan_loss'] for m in g) if g else float('nan'),
                    st.mean(r) if r else float('nan')))
    return out

print()
for name, stem, _ in runs:
    c = curves(stem, 0)
    if not c:
        continue
    print(f'\n{name}, seed 0 — means over each 100 iterations:\n')
    print('| iterations | D acc real | D acc fake | fake loss | D loss | DMD grad norm | GAN loss | reward |')
    print('|---|---|---|---|---|---|---|---|')
    for it, *v in c:
        print(f'| ≤{it} | ' + ' | '.join('–' if x != x else '%.3f' % x for x in v) + ' |')
