"""Experiments built from the jobs: the embedded default run, ``miopt compare`` and its presets, the
discrete toy, and the GSM8K comparison's start."""
