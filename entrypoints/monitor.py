"""MLproject entry point `monitor`: the same command as `lifecycle monitor` (exit 0 ok, 10 warn, 11 retrain)."""

from _run import run

if __name__ == "__main__":
    run("monitor")
