"""MLproject entry point `promote`: the same command as `lifecycle promote`."""

from _run import run

if __name__ == "__main__":
    run("promote")
