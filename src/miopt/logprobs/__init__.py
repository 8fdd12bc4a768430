"""Response log-probabilities: the forward pass and its chunked head (``forward``), batch layouts
(``packing``), the cached reference (``reference``), and the LD-DPO and WPO inputs.

``miopt.logprobs.sequence_logps`` and the other names of ``forward`` stay importable from here (lazily,
so that importing ``packing`` does not load the forward pass).
"""

from miopt import names_of

__getattr__ = names_of(__name__, "forward")
