# SPDX-License-Identifier: Apache-2.0
"""Where the threads of a stuck process are, without a debugger: for each thread its state, the
syscall it is in (or "running"), the kernel function it waits in, and the shared object holding
its user-space program counter (from /proc/PID/task/TID/syscall and /proc/PID/maps). The syscall
file needs ptrace rights over the process (root, or kernel.yama.ptrace_scope 0); without them the
state and wait channel are still shown:

    python3 tests/bench/proc_stacks.py PID
"""
import collections
import sys


def where(pid: int, pc: int) -> str:
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= pc < hi:
            return (parts[5] if len(parts) > 5 else "[anon]") + f"+{pc - lo + int(parts[2], 16):#x}"
    return "?"


def main() -> None:
    pid = int(sys.argv[1])
    import os

    rows = collections.Counter()
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        base = f"/proc/{pid}/task/{tid}"
        try:
            state = open(f"{base}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the thread exited
        try:
            wchan = open(f"{base}/wchan").read().strip() or "-"
        except OSError as e:
            wchan = f"unreadable ({e.strerror})"
        try:
            sc = open(f"{base}/syscall").read().split()
        except OSError as e:
            sc = [f"unreadable({e.strerror})"]
        if sc and sc[0] != "running" and len(sc) >= 3:
            # "nr args... sp pc", or "-1 sp pc" when blocked outside a syscall
            nr, pc = sc[0], where(pid, int(sc[-1], 16))
        else:
            nr, pc = (sc[0] if sc else "?"), "-"
        label = f"state {state} syscall {nr} wchan {wchan} pc {pc}"
        if tid == str(pid):
            print("main thread:", label)
        rows[label] += 1
    for label, n in rows.most_common():
        print(f"{n:4d} x {label}")


if __name__ == "__main__":
    main()
