#!/usr/bin/env python3
import os
"""Interleaved tpi vs distributed-llama decode benchmark. Usage: bench.py OUT.jsonl REPS CONFIG... (CONFIG = N:LINK, LINK = lo|0ms|1ms,300mbit|...)
VARIANTS (env, comma-separated, default auto,star,mesh,rsag,auto-q8) are tpi's allreduce settings: ALGO or ALGO-DTYPE;
SYSTEMS (env, default tpi,dllama) picks the systems. Every process started here is tracked by PID and killed by PID
at the end of its run."""
import json, os, signal, statistics as st, subprocess as sp, sys, time, socket
T = os.environ.get('TPI_BIN', os.path.join(os.environ.get('P4', '/tmp/p4'), 'bin')); D = os.path.join(os.environ.get('P4', '/tmp/p4'), 'dllama/dllama'); W = os.environ.get('P4', '/tmp/p4')
TOK = '31998,72,105,32,116,104,101,114,101'     # = dllama's encoding of "Hi there" with BOS (synthetic tokenizer)
GEN = 65                                         # generated tokens (dllama: --steps 9 + 64 -> 65 predicted)
VARIANTS = os.environ.get('VARIANTS', 'auto,star,mesh,rsag,auto-q8').split(',')
SYSTEMS = os.environ.get('SYSTEMS', 'tpi,dllama').split(',')
SKIP = 2                                         # warm-up decode tokens excluded from the steady-state figures
def load(): return open('/proc/loadavg').read().split()[:3]
def stats(xs): return dict(median=st.median(xs), mean=st.mean(xs), min=min(xs), max=max(xs), n=len(xs))
def listening(port):   # LISTEN state in /proc/net/tcp (connecting to probe would be taken by dllama as its root)
    for f in ('/proc/net/tcp', '/proc/net/tcp6'):
        for l in open(f).readlines()[1:]:
            p = l.split()
            if p[3] == '0A' and int(p[1].split(':')[1], 16) == port: return True
    return False
def wait_port(port, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if listening(port): return True
        time.sleep(0.05)
    raise RuntimeError(f'port {port} not up')
def hwm(pid):
    for l in open(f'/proc/{pid}/status'):
        if l.startswith('VmHWM'): return int(l.split()[1]) * 1024
def kill(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try: p.wait(5)
        except sp.TimeoutExpired: p.kill(); p.wait()

def run_tpi(n, link, variant):
    algo, _, dtype = variant.partition('-')
    cmd = [f'{T}/tpi', 'run', '--model', f'{W}/hf', '--shards', f'{W}/shards{n}', '--tokens', TOK, '--max-tokens', str(GEN),
           '--ignore-eos', '--threads', '1', '--ctx', '2048', '--json', '--profile',
           '--allreduce', algo, '--allreduce-dtype', dtype or 'f32']
    if n > 1: cmd += ['--local-cluster', str(n), '--node-threads', '1']
    if link != 'lo': cmd += ['--link', link]
    t0 = time.time(); r = sp.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode: raise RuntimeError(r.stderr[-2000:])
    j = json.loads(r.stdout); steps = j['steps'][1:]                       # steps[0] = prefill
    per = [s['wall_ms'] for s in steps][SKIP:]
    ranks = {k['rank']: k for k in steps[-1]['ranks']}
    avg = lambda key: st.mean(s['ranks'][0][key] for s in steps[SKIP:])
    prof = [l for l in r.stderr.splitlines() if l.startswith(('profile', '  rank', '     '))]
    algos = sorted({c['algo'] for c in (j.get('backend', {}).get('links') or {}).get('choices', []) if c.get('tokens') == 1})
    return dict(sys='tpi', variant=variant, decode_algo=algos, n=n, link=link, ms=stats(per), gen=len(j['generated_ids']), ids=j['generated_ids'][:8],
                rss_root=ranks[0]['peak_rss_bytes'], rss_worker=ranks.get(1, {}).get('peak_rss_bytes'),
                r0_compute=avg('compute_ms'), r0_arwait=avg('allreduce_wait_ms'), r0_arxfer=avg('allreduce_transfer_ms'),
                profile=prof, wall_s=time.time() - t0, cmd=' '.join(cmd))

def run_dllama(n, link):
    procs = []; workers = []; addrs = []
    try:
        for k in range(1, n):
            wp = sp.Popen([D, 'worker', '--port', str(9000 + k), '--nthreads', '1', '--net-turbo', '0'],
                          stdout=open(f'{W}/logs/dw{k}.log', 'w'), stderr=sp.STDOUT); procs.append(wp); workers.append(wp)
            wait_port(9000 + k)
            if link != 'lo':   # one TCP relay per worker listening port; worker<->worker connections use it too
                rp = sp.Popen([f'{T}/tpi-sim', 'relay', '--tcp', '--listen', f'127.0.0.1:{9100 + k}', '--to', f'127.0.0.1:{9000 + k}',
                               '--link', link], stdout=open(f'{W}/logs/relay{k}.log', 'w'), stderr=sp.STDOUT); procs.append(rp)
                wait_port(9100 + k); addrs.append(f'127.0.0.1:{9100 + k}')
            else: addrs.append(f'127.0.0.1:{9000 + k}')
        cmd = ['/usr/bin/time', '-f', 'MAXRSS_KB %M', D, 'inference', '--model', f'{W}/dllama_model_rand1b_q40.m',
               '--tokenizer', f'{W}/dllama_tokenizer_rand.t', '--buffer-float-type', 'q80', '--nthreads', '1', '--max-seq-len', '2048',
               '--net-turbo', '0', '--prompt', 'Hi there', '--steps', str(9 + GEN - 1), '--temperature', '0']
        if addrs: cmd += ['--workers'] + addrs
        t0 = time.time()
        root = sp.Popen(cmd, stdout=sp.PIPE, stderr=sp.STDOUT, text=True, bufsize=1); procs.append(root)
        ts = []; lines = []; tload = None
        for line in root.stdout:
            now = time.perf_counter(); lines.append(line)
            if line.startswith('🔶'): ts.append(now)
            if 'Weights loaded' in line: tload = time.time() - t0
        root.wait()
        if root.returncode: raise RuntimeError(''.join(lines[-30:]))
        per = [(b - a) * 1000 for a, b in zip(ts, ts[1:])][SKIP - 1:]
        pred = [l for l in lines if l.startswith('🔶')]
        own = [l for l in lines if 'ms/tok' in l]
        rss_root = int([l for l in lines if l.startswith('MAXRSS_KB')][0].split()[1]) * 1024
        rss_worker = hwm(workers[0].pid) if workers else None
        sync = [int(l.split('Sync')[1].split('ms')[0]) for l in pred][SKIP:]
        predms = [int(l.split('Pred')[1].split('ms')[0]) for l in pred][SKIP:]
        sent = [int(l.split('Sent')[1].split('kB')[0]) for l in pred][SKIP:]
        return dict(sys='dllama', n=n, link=link, ms=stats(per), gen=len(pred), toks=[l.split('|')[-1].strip() for l in pred[:8]],
                    own=[l.strip() for l in own], rss_root=rss_root, rss_worker=rss_worker, pred_ms=st.mean(predms),
                    sync_ms=st.mean(sync), sent_kb=st.mean(sent), load_s=tload, wall_s=time.time() - t0, cmd=' '.join(cmd[3:]))
    finally:
        for p in reversed(procs): kill(p)

if __name__ == '__main__':
    out, reps, cfgs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    os.makedirs(f'{W}/logs', exist_ok=True)
    for cfg in cfgs:
        n, link = cfg.split(':', 1); n = int(n)
        runs = [(f'tpi:{v}', lambda v=v: run_tpi(n, link, v)) for v in VARIANTS if 'tpi' in SYSTEMS]
        if 'dllama' in SYSTEMS and link != '0ms': runs.append(('dllama', lambda: run_dllama(n, link)))
        for rep in range(reps):
            for name, fn in runs:
                l0 = load()
                try: r = fn()
                except Exception as e: r = dict(sys=name, n=n, link=link, error=str(e)[-1500:])
                r.update(rep=rep, load_before=l0, load_after=load(), t=time.strftime('%H:%M:%S'))
                with open(out, 'a') as f: f.write(json.dumps(r) + '\n')
                print(r['sys'], r.get('variant', ''), n, link, rep, r.get('ms', {}).get('median'), r.get('error', '')[:300], 'load', l0, flush=True)
