"""MLproject entry point `main`: the whole lifecycle, the same as `lifecycle pipeline`."""

from _run import run

if __name__ == "__main__":
    run("pipeline")
