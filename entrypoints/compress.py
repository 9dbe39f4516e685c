"""MLproject entry point `compress`: the same command as `lifecycle compress`."""

from _run import run

if __name__ == "__main__":
    run("compress")
