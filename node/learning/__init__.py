"""Learning from the reading room: training cases from verdicts, fine-tuned versions awaiting
approval (docs/finetune.md). The training itself is in :mod:`models.training.finetune`, imported
only by the command that runs it."""
