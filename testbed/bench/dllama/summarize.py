#!/usr/bin/env python3
"""Tables from bench.py's JSONL files: per (N, link), distributed-llama and every tpi variant
(median and range over runs of each run's median decode ms/token), their ratios, the one-hop
floor, and the issue's targets. Usage: summarize.py OUT.jsonl... (SINCE/UNTIL=HH:MM:SS pick a
window of run end times).

The one-hop floor of a tpi run: 2 allreduces x LAYERS x the one-way latency, plus rank 0's
measured compute per token, plus the bytes one link carries per token in a one-hop exchange
(every rank's partial to every other: 2 x LAYERS x DIM x payload bytes per element) over the
link's bandwidth."""
import collections, json, os, re, statistics as st, sys

LAYERS, DIM = 16, 2048
ELEM = {'f32': 4.0, 'f16': 2.0, 'bf16': 2.0, 'q8': 34 / 32}
SINCE, UNTIL = os.environ.get('SINCE', '00:00:00'), os.environ.get('UNTIL', '99:99:99')


def link_params(link):
    """(one-way latency ms, bandwidth bit/s or None) of a bench link spec."""
    if link in ('lo', '0ms'):
        return 0.0, None
    lat, bw = 0.0, None
    for part in link.split(','):
        if m := re.fullmatch(r'([\d.]+)(us|ms)', part):
            lat = float(m[1]) / (1000 if m[2] == 'us' else 1)
        elif m := re.fullmatch(r'([\d.]+)(k|m|g)bit', part, re.I):
            bw = float(m[1]) * {'k': 1e3, 'm': 1e6, 'g': 1e9}[m[2].lower()]
    return lat, bw


def floor_ms(r):
    lat, bw = link_params(r['link'])
    dtype = r.get('variant', 'auto').partition('-')[2] or 'f32'
    wire = 0.0 if bw is None or r['n'] == 1 else 2 * LAYERS * DIM * ELEM[dtype] * 8 / bw * 1e3
    hops = 0.0 if r['n'] == 1 else 2 * LAYERS * lat
    return hops + r['r0_compute'] + wire


def med(rs, f=lambda r: r['ms']['median']):
    xs = [f(r) for r in rs]
    return (st.median(xs), min(xs), max(xs)) if xs else None


def main():
    rows = [r for f in sys.argv[1:] for r in map(json.loads, open(f)) if SINCE <= r['t'] <= UNTIL]
    g = collections.defaultdict(list)
    for r in rows:
        if 'error' in r:
            print('ERROR', r['sys'], r['n'], r['link'], r['error'][:300])
            continue
        name = 'dllama' if r['sys'] == 'dllama' else 'tpi ' + r.get('variant', 'auto')
        g[(r['n'], r['link'], name)].append(r)
    order = ['lo', '0ms', '1ms,300mbit', '5ms,100mbit']
    keys = sorted({(n, l) for n, l, _ in g},
                  key=lambda k: (order.index(k[1]) if k[1] in order else 9, k[0]))
    variants = sorted({v for _, _, v in g if v != 'dllama'},
                      key=lambda v: (v != 'tpi auto', v))
    s = lambda x: f'{x[0]:.1f} [{x[1]:.1f}–{x[2]:.1f}]' if x else '-'
    print('| N | link | dllama | ' + ' | '.join(variants) + ' | tpi auto / dllama | one-hop floor (auto) | auto / floor | auto decode algo |')
    print('|---|---|---|' + '---|' * len(variants) + '---|---|---|---|')
    checks = []
    for n, l in keys:
        d = med(g.get((n, l, 'dllama'), []))
        cells = [s(med(g.get((n, l, v), []))) for v in variants]
        a_rs = g.get((n, l, 'tpi auto'), [])
        a = med(a_rs)
        fl = med(a_rs, floor_ms)
        ratio = a[0] / d[0] if a and d else None
        vs_floor = a[0] / fl[0] if a and fl else None
        algos = sorted({x for r in a_rs for x in r.get('decode_algo') or []})
        f2 = lambda x, fmt: format(x, fmt) if x is not None else '-'
        print(f"| {n} | {l} | {s(d)} | " + ' | '.join(cells) +
              f" | {f2(ratio, '.2f')} | {f2(fl and fl[0], '.1f')} | {f2(vs_floor, '.2f')}"
              f" | {','.join(algos) or '-'} |")
        if ratio is not None:
            checks.append((f'N={n} {l}: tpi auto faster than dllama', ratio < 1.0, f'{ratio:.2f}'))
            if n == 4 and l != 'lo':
                checks.append((f'N=4 {l}: tpi auto <= 0.75x dllama', ratio <= 0.75, f'{ratio:.2f}'))
        if vs_floor is not None and l not in ('lo', '0ms'):
            checks.append((f'N={n} {l}: tpi auto within 1.15x of the one-hop floor', vs_floor <= 1.15,
                           f'{vs_floor:.2f}'))
    print()
    for what, ok, val in checks:
        print(f"{'MET   ' if ok else 'MISSED'} {what} ({val})")
    print()
    for (n, l, v), rs in sorted(g.items()):
        for r in rs:
            if v == 'dllama':
                extra = f"pred {r['pred_ms']:.1f} sync {r['sync_ms']:.1f} sentkB/tok {r['sent_kb']:.0f}"
            else:
                extra = (f"r0 compute {r['r0_compute']:.1f} ar-wait {r['r0_arwait']:.1f} "
                         f"ar-xfer {r['r0_arxfer']:.2f} floor {floor_ms(r):.1f} algo {r.get('decode_algo')}")
            print(f"{n} {l} {v} rep{r['rep']} {r['t']} median {r['ms']['median']:.1f} "
                  f"min {r['ms']['min']:.1f} max {r['ms']['max']:.1f} | {extra} | load {r['load_before'][0]}")


if __name__ == '__main__':
    main()
