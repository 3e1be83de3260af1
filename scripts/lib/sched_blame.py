#!/usr/bin/env python3
"""Who held the core while a thread waited for it, from `perf sched timehist`.

Usage: sched_blame.py TIMEHIST GATEWAY_PID MOCK_PID LOAD_PID [THRESHOLD_MS]

Reads the output of `perf sched timehist` (one line per switch-in: time, CPU,
task, wait time, scheduling delay, run time). Each scheduling delay over the
threshold (default 0.2 ms) of a gateway proxy thread, the mock provider or the
load generator is laid over what ran on that CPU meanwhile, and the overlap is
charged to that task's group. The gateway's threads are split into its proxy
threads and its usage writer (the `ai4free-usage` thread and the blocking
threads its runtime runs SQLite on). Prints a Markdown table.
"""
import bisect
import collections
import re
import sys

LINE = re.compile(
    r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$"
)
TASK = re.compile(r"^(.*)\[(\d+)(?:/(\d+))?\]$")


def group(task, gateway, mock, load):
    m = TASK.match(task)
    if not m:
        return "idle" if task == "<idle>" else task
    name, pid = m.group(1), m.group(3) or m.group(2)
    if pid == gateway:
        if name == "ai4free proxy":
            return "gateway proxy threads"
        if name in ("ai4free-usage", "tokio-rt-worker"):
            return "gateway usage writer"
        return "gateway, other threads"
    if pid == mock:
        return "mock provider"
    if pid == load:
        return "load generator"
    return "other: " + re.sub(r"[:/].*", "", name)


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    path, gateway, mock, load = sys.argv[1:5]
    threshold = float(sys.argv[5]) if len(sys.argv) > 5 else 0.2
    runs = []  # (cpu, start s, end s, group, scheduling delay ms)
    for line in open(path, encoding="utf-8", errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        t, cpu, task, _wait, delay, run = m.groups()
        end, run_s = float(t), float(run) / 1e3
        runs.append((cpu, end - run_s, end, group(task, gateway, mock, load), float(delay)))
    by_cpu = collections.defaultdict(list)
    for r in runs:
        by_cpu[r[0]].append(r)
    for cpu_runs in by_cpu.values():
        cpu_runs.sort(key=lambda r: r[1])
    # A CPU's runs do not overlap, so their ends are sorted too: each wait
    # starts its scan at the first run still going when the wait began.
    ends = {cpu: [r[2] for r in cpu_runs] for cpu, cpu_runs in by_cpu.items()}
    waiters = ["gateway proxy threads", "mock provider", "load generator"]
    print(f"| waiting | waits > {threshold} ms | their total, ms | what held the core meanwhile, ms |")
    print("|---|---|---|---|")
    for who in waiters:
        blame = collections.Counter()
        n, total = 0, 0.0
        for cpu, start, _end, g, delay in runs:
            if g != who or delay <= threshold:
                continue
            n += 1
            total += delay
            w0, w1 = start - delay / 1e3, start
            cpu_runs = by_cpu[cpu]
            for i in range(bisect.bisect_right(ends[cpu], w0), len(cpu_runs)):
                _c, s, e, og, _d = cpu_runs[i]
                if s >= w1:
                    break
                overlap = min(e, w1) - max(s, w0)
                if overlap > 0:
                    blame[og] += overlap * 1e3
        held = ", ".join(f"{g} {ms:.1f}" for g, ms in blame.most_common(6))
        print(f"| {who} | {n} | {total:.1f} | {held} |")
    long_runs = collections.Counter()
    long_ms = collections.Counter()
    for _c, s, e, g, _d in runs:
        if e - s > 0.5e-3 and g != "idle":
            long_runs[g] += 1
            long_ms[g] += (e - s) * 1e3
    print()
    print("| runs over 0.5 ms | count | total, ms |")
    print("|---|---|---|")
    for g, n in long_runs.most_common(8):
        print(f"| {g} | {n} | {long_ms[g]:.1f} |")


if __name__ == "__main__":
    main()
