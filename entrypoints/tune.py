"""MLproject entry point `tune`: the same command as `lifecycle tune`."""

from _run import run

if __name__ == "__main__":
    run("tune")
