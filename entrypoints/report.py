"""MLproject entry point `report`: the same command as `lifecycle report` (one self-contained HTML page)."""

from _run import run

if __name__ == "__main__":
    run("report")
