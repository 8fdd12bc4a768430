"""One module per ``miopt`` sub-command (see miopt.cli).

Each command imports its job inside ``run``, not at the top: ``miopt --help`` builds every command's
parser, and a job's imports (transformers' model code, accelerate, matplotlib, math-verify) would
add seconds to it. The one other place with deferred imports for the same reason is
``experiments/compare/presets.py`` (``miopt compare --help`` lists the presets); elsewhere a
function-local import is an optional package (matplotlib, peft, trl, the trackers, gguf, fcntl) or
transformers' model code that importing the module alone must not load.
"""
