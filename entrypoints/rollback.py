"""MLproject entry point `rollback`: the same command as `lifecycle rollback`."""

from _run import run

if __name__ == "__main__":
    run("rollback")
