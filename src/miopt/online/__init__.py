"""Online training with verifiable rewards (``miopt online``): rounds of sample -> score -> pair ->
update (``rounds``), their options, pairing rules, scorers, verifiers and run folder.

``miopt.online.run_online`` and the other names of ``rounds`` stay importable from here (lazily, so
that importing ``miopt.online.verifiers`` does not load the whole online job).
"""

from miopt import names_of

__getattr__ = names_of(__name__, "rounds")
