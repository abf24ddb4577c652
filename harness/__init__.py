"""RobustArena harness: data, models, threat models, evaluation, results store, leaderboard, CLI."""

__version__ = "0.1.0"
