"""One module per ``miopt`` sub-command (see miopt.cli)."""
