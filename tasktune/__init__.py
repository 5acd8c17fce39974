"""tasktune: one base model, many dialogue-understanding tasks.

Compare one LoRA adapter per task, one multi-task adapter and CGC-LoRA on your own
tasks, then serve the winner from one base model.
"""

__version__ = "0.1.0"
