"""Sudoku as a DiffusionGemma task: puzzles and their tokens (board), solving and scoring with a checkpoint (solve),
the training recipe (train), the `dgemma sudoku`, `eval sudoku` and `train sudoku` commands (cli), and the shipped
models (models/, package data)."""
