"""Test-session settings: W&B never goes online from a test, and stays quiet."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
