#!/usr/bin/env python3
"""Summarises `tpi run --json` outputs of scripts/bench-70b.sh.

usage: report.py READ_GBS LAYERS RUN.json [RUN.json ...]   (each run's file name: <link>.json)

Prints per run: TTFT, decode ms/token (median over decode steps), per rank compute, disk
wait, allreduce wait, bytes read per token and peak RSS, the disk-read limit (all ranks'
bytes per token / the measured sequential read bandwidth: one disk serves every rank
here), and the ratio; then what the links added against the loopback run.
"""
import json
import os
import statistics as st
import sys


def med(xs):
    return st.median(xs) if xs else float("nan")


def main():
    read_gbs = float(sys.argv[1])
    layers = int(sys.argv[2])
    runs = {}
    for path in sys.argv[3:]:
        name = os.path.basename(path)[: -len(".json")]
        with open(path) as f:
            j = json.load(f)
        decode = j["steps"][1:]
        if not decode:
            sys.exit(f"{path}: no decode steps")
        tok_ms = med([s["wall_ms"] for s in decode])
        n_ranks = len(decode[-1]["ranks"])
        per_rank = []
        for r in range(n_ranks):
            rs = [s["ranks"][r] for s in decode if len(s["ranks"]) > r]
            per_rank.append(
                dict(
                    rank=rs[0]["rank"],
                    compute=med([x["compute_ms"] for x in rs]),
                    disk_wait=med([x["disk_wait_ms"] for x in rs]),
                    ar_wait=med([x["allreduce_wait_ms"] for x in rs]),
                    read=med([x["disk_read_bytes"] for x in rs]),
                    rss=max(x["peak_rss_bytes"] for x in rs),
                )
            )
        total_read = sum(p["read"] for p in per_rank)
        limit_ms = total_read / (read_gbs * 1e9) * 1e3
        runs[name] = tok_ms
        print(f"## {name}: {n_ranks} ranks, {layers} layers")
        print(
            f"TTFT {j['ttft_ms']:.0f} ms ({j['prefill_tokens']} prompt tokens); "
            f"decode {tok_ms:.0f} ms/token (median of {len(decode)})"
        )
        print(
            f"disk-read limit {limit_ms:.0f} ms/token ({total_read / 1e9:.2f} GB a token at "
            f"{read_gbs:.2f} GB/s, one disk for all ranks): decode / limit = {tok_ms / limit_ms:.2f}; "
            f"effective read rate {total_read / tok_ms / 1e6:.2f} GB/s"
        )
        print("| rank | compute ms | disk wait ms | allreduce wait ms | read MB/token | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for p in per_rank:
            print(
                f"| {p['rank']} | {p['compute']:.1f} | {p['disk_wait']:.1f} | {p['ar_wait']:.1f} "
                f"| {p['read'] / 1e6:.0f} | {p['rss'] / 2**20:.0f} |"
            )
        print()
    base = runs.get("loopback")
    for name, ms in runs.items():
        if name == "loopback" or base is None:
            continue
        # "lat" in e.g. 1ms,300mbit: the bound is 2 allreduces a layer x 2 hops x latency, +10%.
        lat_ms = float(name.split(",")[0].rstrip("ms"))
        bound = 2 * layers * 2 * lat_ms * 1.1
        print(
            f"{name} added {ms - base:.0f} ms/token over loopback "
            f"(bound: 2 x {layers} layers x 2 hops x {lat_ms:g} ms + 10% = {bound:.0f} ms)"
        )


if __name__ == "__main__":
    main()
