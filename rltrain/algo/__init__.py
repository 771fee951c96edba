"""Algorithm library: registries of pure tensor functions (see docs/algorithms.md).

``get(kind, name)`` / ``register(kind, name)`` with kinds ``advantage``, ``policy_loss``, ``kl``, ``agg``.
Importing this package registers every built-in.
"""

from rltrain.algo import advantages, aggregation, kl, losses  # noqa: F401  (registers the built-ins)
from rltrain.algo.advantages import advantages_for_batch, whiten
from rltrain.algo.dynamic_sampling import DynamicSamplingError, GroupFilter
from rltrain.algo.filters import apply_overlong_filter, nonconstant_group_mask, overlong_filter_mask, overlong_penalty
from rltrain.algo.kl import kl_reward_penalty
from rltrain.algo.losses import PolicyLoss, Surrogate, make_loss_fn, tis_weights
from rltrain.algo.registry import KINDS, UnknownNameError, get, metadata, names, register
from rltrain.algo.thr import thr_extras, thr_extras_from_forward, token_hidden_reward

__all__ = [
    "KINDS",
    "DynamicSamplingError",
    "GroupFilter",
    "PolicyLoss",
    "Surrogate",
    "UnknownNameError",
    "advantages_for_batch",
    "apply_overlong_filter",
    "get",
    "kl_reward_penalty",
    "make_loss_fn",
    "metadata",
    "names",
    "nonconstant_group_mask",
    "overlong_filter_mask",
    "overlong_penalty",
    "register",
    "thr_extras",
    "thr_extras_from_forward",
    "tis_weights",
    "token_hidden_reward",
    "whiten",
]
