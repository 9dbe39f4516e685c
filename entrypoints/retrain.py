"""MLproject entry point `retrain`: the same command as `lifecycle retrain` (continuous training)."""

from _run import run

if __name__ == "__main__":
    run("retrain")
