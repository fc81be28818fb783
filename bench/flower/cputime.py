#!/usr/bin/env python3
"""Runs a command and reports the CPU time (user + system) of it and of every process it starts,
including those it leaves behind: this process becomes a child subreaper, so orphaned
descendants are re-parented to it and reaped here, and their usage is counted.
Usage: cputime.py OUT_FILE CMD [ARGS...]; writes "user_s sys_s" to OUT_FILE, exits as CMD did."""
import ctypes
import os
import resource
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def main():
    out, cmd = sys.argv[1], sys.argv[2:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
    rc = subprocess.call(cmd)
    deadline = time.time() + 30
    while True:  # reap what the command left running (it told them to stop)
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if time.time() > deadline:
                print("cputime: descendants still running after 30 s; not counted", file=sys.stderr)
                break
            time.sleep(0.05)
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        f.write(f"{r.ru_utime:.2f} {r.ru_stime:.2f}\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
