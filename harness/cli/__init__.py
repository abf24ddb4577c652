from harness.cli.dispatch import main  # the `arena` console script (pyproject: harness.cli:main)

__all__ = ["main"]
