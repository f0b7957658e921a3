"""The language tie: differentiable alignment of image embeddings with a level's attribute texts.

Each loss takes, for one hierarchy level:

- ``u``: image embeddings already mapped into the text space, shape ``[B, D]``;
- ``text``: that level's frozen attribute embeddings (one row per attribute, prompt-ensembled),
  shape ``[A, D]``; treated as constants (detached), they never receive gradients;
- ``groups``: the level's integer ids, shape ``[B]`` (equal id = same patch / slide / patient).

Both ``u`` and ``text`` are L2-normalised inside. The result is a scalar tensor attached to the
graph of ``u`` -- unlike the reference implementation, which returned a Python float (via
``.item()``) and therefore never trained anything.

Group statistics and the balancing term use the whole batch given; in multi-process training
pass the all-gathered batch. Nothing here talks to ``torch.distributed``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hlss.losses.hvc import check_temperature, full_precision, upcast


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """``log softmax`` as ``x - logsumexp(x)``: equally stable, and avoids a slow CPU kernel path
    of ``F.log_softmax`` on small tensors seen with some thread settings."""
    return x - torch.logsumexp(x, dim=dim, keepdim=True)


def check_alignment_inputs(u: Tensor, text: Tensor, groups: Tensor | None) -> None:
    """Validate the shapes of an alignment loss's inputs.

    Raises:
        ValueError: ``u`` is not ``[B, D]``, ``text`` is not ``[A, D]`` with ``A >= 1`` and the
            same ``D``, or ``groups`` is given and is not of shape ``[B]``.
    """
    if u.dim() != 2:
        raise ValueError(f"u must have shape [B, D], got {tuple(u.shape)}")
    if text.dim() != 2 or text.shape[0] < 1:
        raise ValueError(f"text must have shape [A, D] with A >= 1, got {tuple(text.shape)}")
    if text.shape[1] != u.shape[1]:
        raise ValueError(
            f"u {tuple(u.shape)} and text {tuple(text.shape)} must have the same embedding "
            "dimension D"
        )
    if groups is not None and (groups.dim() != 1 or groups.shape[0] != u.shape[0]):
        raise ValueError(
            f"groups must have shape [B] = [{u.shape[0]}] to match u, got {tuple(groups.shape)}"
        )


class NearestDescriptionKL(nn.Module):
    """The reference HLSS alignment, made differentiable.

    For each image ``i`` the target is the text embedding ``t_i`` of its nearest attribute
    (argmax of cosine similarity; the choice carries no gradient). With ``p_i = softmax(u_i /
    tau_e)`` and ``q_i = softmax(t_i / tau_e)`` taken over the ``D`` embedding *dimensions* (as
    the reference compared them), the loss is the mean over images of the symmetric
    (Jeffreys) divergence ``KL(p_i || q_i) + KL(q_i || p_i)``.

    Args:
        temperature: ``tau_e`` (> 0). Entries of unit vectors are small (about ``1/sqrt(D)``),
            so a softmax at temperature 1 is almost flat and the loss nearly vanishes; the
            default 0.1 sharpens both distributions enough to give a useful signal.

    Raises:
        ValueError: ``temperature`` is not > 0.

    ``forward(u [B, D], text [A, D], groups [B] | None) -> Tensor[]``; ``groups`` is accepted
    for a uniform call signature and only shape-checked. Raises ``ValueError`` on mismatched
    shapes (see :func:`check_alignment_inputs`).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, u: Tensor, text: Tensor, groups: Tensor | None = None) -> Tensor:
        check_alignment_inputs(u, text, groups)
        with full_precision(u.device):
            x = F.normalize(upcast(u), dim=1)
            t = F.normalize(upcast(text.detach()).to(x.device, x.dtype), dim=1)
            nearest = (x.detach() @ t.t()).argmax(dim=1)
            target = t[nearest]
            log_p = log_softmax(x / self.temperature, dim=1)
            log_q = log_softmax(target / self.temperature, dim=1)
            jeffreys = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1)
            return jeffreys.mean()


class AttributeConsistency(nn.Module):
    """Consistency in attribute space with a balancing term (the default language tie).

    ``p_i = softmax(cos(u_i, text) / tau)`` is image ``i``'s distribution over the ``A``
    attributes. Its target ``q_i`` is the mean of ``p`` over the members of ``i``'s group
    (including ``i``; without gradient), and::

        consistency = mean_i KL(q_i || p_i)            (images alone in their group add 0)
        balance     = log A - H(mean_i p_i)            (>= 0; 0 iff the batch mean is uniform)
        loss        = consistency + balance_weight * balance

    The consistency pulls the views / patches / slides of one group onto the same attribute
    profile; the balance term (batch-mean entropy maximisation) stops every image from collapsing
    onto one attribute. Because the text prototypes are fixed and named, the learned
    representation stays readable as attribute probabilities.

    Args:
        temperature: ``tau`` (> 0) of the softmax over attributes.
        balance: weight (>= 0) of the balancing term.

    Raises:
        ValueError: ``temperature`` is not > 0 or ``balance`` is negative.

    ``forward(u [B, D], text [A, D], groups [B]) -> Tensor[]`` returns the total;
    :meth:`terms` returns ``{"consistency", "balance"}`` (the balance term *unweighted*). Both
    raise ``ValueError`` on mismatched shapes (see :func:`check_alignment_inputs`) or when
    ``groups`` is missing.
    """

    def __init__(self, temperature: float = 0.1, balance: float = 1.0):
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        balance = float(balance)
        if not (balance >= 0 and balance != float("inf")):
            raise ValueError(f"balance must be a finite number >= 0, got {balance}")
        self.balance = balance

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, balance={self.balance}"

    def terms(self, u: Tensor, text: Tensor, groups: Tensor) -> dict[str, Tensor]:
        """The two terms: ``{"consistency": Tensor[], "balance": Tensor[]}`` (balance unweighted)."""
        if groups is None:
            raise ValueError("AttributeConsistency needs groups of shape [B]")
        check_alignment_inputs(u, text, groups)
        with full_precision(u.device):
            x = F.normalize(upcast(u), dim=1)
            t = F.normalize(upcast(text.detach()).to(x.device, x.dtype), dim=1)
            log_p = log_softmax(x @ t.t() / self.temperature, dim=1)  # [B, A]
            p = log_p.exp()

            groups = groups.to(x.device)
            same = (groups[:, None] == groups[None, :]).to(p.dtype)  # [B, B]
            size = same.sum(dim=1)  # [B], >= 1 (self)
            q = ((same @ p.detach()) / size[:, None]).detach()  # [B, A]
            # KL(q || p) per image; xlogy makes 0 * log 0 = 0 (q is a constant here).
            kl = (torch.special.xlogy(q, q) - q * log_p).sum(dim=1)
            kl = torch.where(size > 1, kl, torch.zeros_like(kl))
            consistency = kl.mean()

            mean_p = p.mean(dim=0)
            tiny = torch.finfo(mean_p.dtype).tiny
            entropy = -(mean_p * mean_p.clamp_min(tiny).log()).sum()
            balance = (math.log(t.shape[0]) - entropy).clamp_min(0.0)
        return {"consistency": consistency, "balance": balance}

    def forward(self, u: Tensor, text: Tensor, groups: Tensor) -> Tensor:
        terms = self.terms(u, text, groups)
        return terms["consistency"] + self.balance * terms["balance"]
