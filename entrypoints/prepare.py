"""MLproject entry point `prepare`: the same command as `lifecycle prepare`."""

from _run import run

if __name__ == "__main__":
    run("prepare")
