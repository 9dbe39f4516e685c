"""MLproject entry point `train`: the same command as `lifecycle train`."""

from _run import run

if __name__ == "__main__":
    run("train")
