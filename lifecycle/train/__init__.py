"""Training: model presets, the loop, checkpoints, DDP, and the MLflow orchestration.

``lifecycle.train.run.train`` is the stage's entry; ``lifecycle.train.loop.Trainer`` is the
MLflow-free loop. Nothing is imported here so that ``import lifecycle.train`` stays cheap.
"""
