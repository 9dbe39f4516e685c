"""MLproject entry point `canary`: the same command as `lifecycle canary` (exit 0 holds, 10 not enough evidence,
11 worse)."""

from _run import run

if __name__ == "__main__":
    run("canary")
