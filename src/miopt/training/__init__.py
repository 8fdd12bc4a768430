"""Training jobs on the shared loop: preference training (``preference``, its paired and unpaired
steps), supervised fine-tuning (``sft``), reward models (``reward``), and their option checks."""
