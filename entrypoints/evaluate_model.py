"""MLproject entry point `evaluate`: the same command as `lifecycle evaluate`.

Named evaluate_model.py, not evaluate.py: a script's folder comes first on sys.path, and a file
called evaluate.py would hide the Hugging Face `evaluate` package the metrics are loaded with.
"""

from _run import run

if __name__ == "__main__":
    run("evaluate")
