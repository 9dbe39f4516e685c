"""MLproject entry point `predict`: the same command as `lifecycle predict`."""

from _run import run

if __name__ == "__main__":
    run("predict")
