"""Contrastive losses for CLIP pretraining: InfoNCE (CLIP) and sigmoid (SigLIP), single- or multi-process; and, at
the end, the latent-diffusion autoencoder's loss (`AutoencoderKLLoss`: reconstruction + KL).

Both losses take the raw projected embeddings of a batch of image-text pairs (row ``i`` of the images matches row
``i`` of the texts), L2-normalise them, and score every image against every text with a learnable temperature.

Temperature convention: ``logit_scale`` is the *log* of the inverse temperature, as stored in transformers'
``CLIPModel.logit_scale`` (initialised to ln(1 / 0.07)). The losses clamp it to at most ``max_logit_scale``
(ln 100, Radford et al. 2021, sec. 2.5) and then exponentiate. ``torch.clamp`` passes the gradient through
unchanged below the maximum and gives a zero gradient above it, so a parameter that an optimizer pushes past ln 100
no longer moves through this loss: clamp the parameter in place after the optimizer step as well (as open_clip
does) if its stored value matters.

Distributed training: when ``torch.distributed`` is initialised with a world size above 1, each process gathers the
features of all processes *with gradient* and computes the loss of its own rows against the global batch. The
backward of the gather sums, on each process, the gradients that all processes computed for its rows, so after DDP
averages the parameter gradients over processes, training matches one process on the global batch (the mean of the
per-process losses equals the single-process loss). Every process must have the same local batch size, unless
`ClipLoss` is told that they differ (``uneven``); its hard negatives may number differently on each.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401  (makes torch.distributed.nn.functional.all_gather available)

MAX_LOGIT_SCALE = math.log(100.0)
"""Upper clamp of the log inverse temperature (CLIP: "clipped to prevent scaling the logits by more than 100")."""
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
"""CLIP's initial log inverse temperature (transformers' ``CLIPConfig.logit_scale_init_value`` = 2.6592)."""
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
"""SigLIP's initial log inverse temperature (Zhai et al. 2023: t' = log 10)."""
SIGLIP_LOGIT_BIAS_INIT = -10.0
"""SigLIP's initial logit bias (Zhai et al. 2023, sec. 3.2)."""


def resolve_rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Fill ``rank`` / ``world_size`` left as None from ``torch.distributed`` (0 / 1 when it is not initialised)."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1 and not initialised:
        raise ValueError(
            f"world_size={world_size} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or Accelerate); pass world_size=1 for a single process"
        )
    return rank, world_size


def all_gather_features(features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True) -> torch.Tensor:
    """Concatenate the ``(b, d)`` features of every process into ``(world_size * b, d)``, rank-major.

    Rows ``rank * b : (rank + 1) * b`` of the result are this process's own rows. With ``with_grad=True`` the gather
    is differentiable (``torch.distributed.nn.functional.all_gather``): its backward sums, over all processes, the
    gradients computed for each process's rows and returns the sum to the process that owns them. With
    ``with_grad=False`` the other processes' rows are constants and only the local rows carry a gradient.
    """
    if world_size == 1:
        return features
    if with_grad:
        # torch 2.14 marks torch.distributed.nn.functional as deprecated in favour of the private
        # torch.distributed._functional_collectives; keep the public API and silence only that warning.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                category=FutureWarning,
            )
            chunks = list(torch.distributed.nn.functional.all_gather(features))
    else:
        chunks = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(chunks, features.detach().contiguous())
        chunks[rank] = features  # keep the gradient through the local rows
    return torch.cat(chunks, dim=0)


def gather_counts(num_rows: int, device: torch.device, world_size: int) -> list[int]:
    """The row count of every process, rank-major (one small collective and a wait for it on the host)."""
    if world_size == 1:
        return [num_rows]
    count = torch.tensor([num_rows], device=device, dtype=torch.long)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    return [int(c) for c in counts]


def all_gather_rows(
    features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True, counts: list[int] | None = None
) -> torch.Tensor:
    """`all_gather_features` for ``(n_r, d)`` features whose row count ``n_r`` differs between processes: the
    ``(sum_r n_r, d)`` rows of all processes, rank-major. Each process's rows are padded to the largest count for
    the gather and the padding dropped after it; the counts are exchanged first (`gather_counts`) unless given."""
    if world_size == 1:
        return features
    if counts is None:
        counts = gather_counts(features.shape[0], features.device, world_size)
    most = max(counts)
    if most == 0:  # every process agrees: nothing to gather
        return features
    padded = F.pad(features, (0, 0, 0, most - features.shape[0]))  # (most, d)
    gathered = all_gather_features(padded, rank, world_size, with_grad)  # (world_size * most, d)
    return torch.cat([gathered[r * most : r * most + n] for r, n in enumerate(counts)])


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both have shape (batch, dim) with the same batch and dim, got "
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)}"
        )


def _check_pair_weights(pair_weights: torch.Tensor, pairs: torch.Tensor) -> None:
    """A shape check only: the values (>= 0, the caller's) would cost a device-to-host copy per step."""
    if pair_weights.shape != pairs.shape[:1]:
        raise ValueError(
            f"pair_weights must have shape (num_pairs,) = {tuple(pairs.shape[:1])} like pairs' rows, got "
            f"{tuple(pair_weights.shape)}"
        )


def _scale(logit_scale: torch.Tensor | float, max_logit_scale: float | None, like: torch.Tensor) -> torch.Tensor:
    """exp(min(logit_scale, max_logit_scale)): the multiplier of the cosine similarities."""
    logit_scale = torch.as_tensor(logit_scale, device=like.device)
    if max_logit_scale is not None:
        logit_scale = logit_scale.clamp(max=max_logit_scale)
    return logit_scale.exp()


class ClipLoss(nn.Module):
    """Symmetric InfoNCE loss of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
    Language Supervision", fig. 3): the mean of the image->text and text->image cross-entropies over the scaled
    cosine-similarity matrix, whose diagonal holds the matching pairs.

    Hard negatives (NegCLIP: Yuksekgonul et al., "When and Why Vision-Language Models Behave like Bags-of-Words, and
    What to Do About It?", ICLR 2023, sec. 4): ``forward``'s ``negative_features`` are ``h`` more texts that match
    no image (captions with attributes or relations swapped, `clipcond.data.hard_negatives`). They join the columns
    of the image->text logits, ``(b, b + h)``, so each image must score its caption above them as well; the
    text->image term stays over the ``b`` real captions. In a multi-process run every process gathers all
    processes' negatives, as it gathers the captions (with gradient when ``gather_with_grad``), and ``h`` may
    differ between processes. Without negatives (None) the loss is the plain one, computed as before.

    Pair term (``pair_weight`` > 0): ``forward``'s ``pairs`` name rows that are hard negatives of each other in both
    modalities, an image and its counterfactual twin with their captions (`clipcond.data.counterfactual`). Each
    such pair also adds the mean of four two-way cross-entropies, each image against its caption and the other's,
    each caption against its image and the other's, times ``pair_weight``: a loss of its own over the pair, as the
    hard-negative terms that FSC-CLIP (Oh et al. 2024, arXiv:2410.05210) adds beside the batch's, so that the
    distinction the twin makes is not one column among the batch's many. It weighs like one row of the batch's
    loss at weight 1, and needs no gather: both rows of a pair are on the same process. ``forward``'s
    ``pair_weights`` weigh each pair on its own in place of ``pair_weight`` (twins of several kinds, each at its
    weight: `clipcond train clip --counterfactual-kind-weights`).

    Args:
        local_loss: in a multi-process run, each process scores only its own ``b`` images (texts) against the
            ``B = world_size * b`` gathered texts (images): logits ``(b, B)``, memory ``b * B``, labels offset by
            ``rank * b`` (with ``uneven``: ``B`` the sum of the processes' ``b``, the offset that of the earlier
            processes). With False every process computes the full ``(B, B)`` loss (same value on every process).
        gather_with_grad: gather the other processes' features with gradient (exact gradients). False gathers
            them as constants: less communication in the backward, but only the local rows get gradient, so the
            gradients no longer match single-process training.
        rank, world_size: taken from ``torch.distributed`` at each call when None; 0 and 1 without a process group.
        max_logit_scale: clamp of ``logit_scale`` before ``exp`` (None: no clamp).
        pair_weight: weight of the pair term (0: none, ``pairs`` ignored unless ``forward`` gets ``pair_weights``).

    Reference implementation: open_clip ``loss.py`` (Ilharco et al.), whose steps this follows.
    """

    def __init__(
        self,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        max_logit_scale: float | None = MAX_LOGIT_SCALE,
        pair_weight: float = 0.0,
    ):
        super().__init__()
        if not pair_weight >= 0:
            raise ValueError(f"`pair_weight` must be >= 0, got {pair_weight}")
        self.pair_weight = pair_weight
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.max_logit_scale = max_logit_scale
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def get_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor,
        negative_features: torch.Tensor | None = None,
        counts: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled similarities of L2-normalised ``(b, d)`` features; ``scale`` is the multiplier (already exp'd);
        ``negative_features``: L2-normalised ``(h, d)`` hard negatives or None; ``counts``: every process's ``b``
        where they differ (`gather_counts`), None where all are equal.

        Returns ``(logits_per_image, logits_per_text)``: ``(b, b)`` each in one process; ``(b, B)`` each with
        ``local_loss`` in a multi-process run (own rows against all columns); ``(B, B)`` each otherwise. With
        negatives, ``logits_per_image`` has their ``H`` (all processes' ``h``) columns after the captions' ones.
        """
        rank, world_size = resolve_rank_and_world_size(self.rank, self.world_size)
        if world_size == 1:
            if negative_features is None:
                logits_per_image = scale * image_features @ text_features.T  # (b, b)
                return logits_per_image, logits_per_image.T
            columns = torch.cat([text_features, negative_features])  # (b + h, d)
            logits_per_image = scale * image_features @ columns.T  # (b, b + h)
            return logits_per_image, logits_per_image[:, : text_features.shape[0]].T
        if counts is None:
            all_image = all_gather_features(image_features, rank, world_size, self.gather_with_grad)  # (B, d)
            all_text = all_gather_features(text_features, rank, world_size, self.gather_with_grad)  # (B, d)
        else:
            all_image = all_gather_rows(image_features, rank, world_size, self.gather_with_grad, counts)  # (B, d)
            all_text = all_gather_rows(text_features, rank, world_size, self.gather_with_grad, counts)  # (B, d)
        columns = all_text
        if negative_features is not None:
            all_negatives = all_gather_rows(negative_features, rank, world_size, self.gather_with_grad)  # (H, d)
            columns = torch.cat([all_text, all_negatives])  # (B + H, d)
        if self.local_loss:
            logits_per_image = scale * image_features @ columns.T  # (b, B + H)
            logits_per_text = scale * text_features @ all_image.T  # (b, B)
            return logits_per_image, logits_per_text
        logits_per_image = scale * all_image @ columns.T  # (B, B + H)
        return logits_per_image, logits_per_image[:, : all_text.shape[0]].T

    @staticmethod
    def pair_losses(
        image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        """The ``(p,)`` pair terms of L2-normalised ``(b, d)`` features for ``pairs`` ``(p, 2)`` of local rows: the
        mean of the four two-way cross-entropies, ``-log softmax`` over two logits being ``softplus(other - own)``."""
        a, b = pairs.unbind(1)

        def sim(images, texts):
            return scale * (image_features[images] * text_features[texts]).sum(-1)

        aa, ab, ba, bb = sim(a, a), sim(a, b), sim(b, a), sim(b, b)
        images_pick_captions = F.softplus(ab - aa) + F.softplus(ba - bb)
        captions_pick_images = F.softplus(ba - aa) + F.softplus(ab - bb)
        return (images_pick_captions + captions_pick_images) / 4

    def get_ground_truth(self, device: torch.device, num_rows: int, offset: int = 0) -> torch.Tensor:
        """Class index of each logits row: ``offset + arange(num_rows)`` (LongTensor), cached per device and size."""
        key = (device, num_rows, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + num_rows, device=device, dtype=torch.long)
        return self._labels[key]

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        output_dict: bool = False,
        negative_features: torch.Tensor | None = None,
        uneven: bool = False,
        pairs: torch.Tensor | None = None,
        pair_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss of a batch of pairs: a scalar, or ``{"contrastive_loss": scalar}`` with ``output_dict``.

        ``image_features``, ``text_features``: ``(b, d)`` projected embeddings, row ``i`` of one matching row ``i``
        of the other; they are L2-normalised here (already normalised inputs are fine). ``logit_scale``: log of the
        inverse temperature (a 0-dim parameter such as ``CLIPModel.logit_scale``, or a float).
        ``negative_features``: ``(h, d)`` embeddings of hard-negative texts (``h`` may be 0), or None for none; in
        a multi-process run pass a tensor (or None) on every process alike, as they gather together.
        ``uneven``: the processes may hold different numbers of pairs ``b`` (counterfactual pairs join some
        batches): they exchange their counts, and each row's loss weighs ``1 / B`` of the global batch's ``B``
        pairs, so that the mean over processes is still the loss of one process on the global batch. Pass it on
        every process alike.
        ``pairs``: ``(p, 2)`` long, local rows that are each other's hard negatives (the pair term; ``p`` may be 0
        and differ between processes), or None. ``pair_weights``: ``(p,)`` weight of each pair's term, in place of
        ``pair_weight`` (None: ``pair_weight`` for every pair).
        """
        _check_features(image_features, text_features)
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        if negative_features is not None:
            if negative_features.ndim != 2 or negative_features.shape[1] != text_features.shape[1]:
                raise ValueError(
                    f"negative_features must have shape (num_negatives, {text_features.shape[1]}) like the texts, "
                    f"got {tuple(negative_features.shape)}"
                )
            negative_features = F.normalize(negative_features, dim=-1)
            rank, world_size = resolve_rank_and_world_size(self.rank, self.world_size)
            if world_size == 1 and negative_features.shape[0] == 0:
                negative_features = None  # no columns to add: the plain loss, computed as without negatives
        scale = _scale(logit_scale, self.max_logit_scale, image_features)

        rank, world_size = resolve_rank_and_world_size(self.rank, self.world_size)
        num_rows = image_features.shape[0]
        counts = gather_counts(num_rows, image_features.device, world_size) if uneven and world_size > 1 else None
        logits_per_image, logits_per_text = self.get_logits(
            image_features, text_features, scale, negative_features, counts
        )
        if counts is None:
            offset = rank * num_rows if world_size > 1 and self.local_loss else 0
            labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0], offset)
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        else:
            offset = sum(counts[:rank]) if self.local_loss else 0
            # not cached: with uneven batches the (rows, offset) key changes from step to step
            labels = torch.arange(offset, offset + logits_per_image.shape[0], device=image_features.device)
            # each process's share of the mean over the B rows; DDP's mean over processes multiplies it back
            rows_per_process = sum(counts) / world_size if self.local_loss else sum(counts)
            summed = F.cross_entropy(logits_per_image, labels, reduction="sum")
            summed = summed + F.cross_entropy(logits_per_text, labels, reduction="sum")
            loss = summed / (2 * rows_per_process)
        if pairs is not None and (self.pair_weight > 0 or pair_weights is not None):
            # each pair weighs as one row of the global batch: its share per process as the rows' (see `uneven`)
            rows = num_rows if counts is None else sum(counts) / world_size
            pair_losses = self.pair_losses(image_features, text_features, scale, pairs)  # (p,)
            if pair_weights is None:
                loss = loss + self.pair_weight * pair_losses.sum() / rows
            else:
                _check_pair_weights(pair_weights, pairs)
                loss = loss + (pair_weights.to(pair_losses) * pair_losses).sum() / rows
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
    arXiv:2303.15343, alg. 1): every image-text pair is an independent binary classification, label +1 on the
    diagonal and -1 elsewhere, on logits ``exp(logit_scale) * cos + logit_bias``; the sum over all pairs is divided
    by the (local) batch size ``b``, as in the paper.

    Multi-process: every process gathers the texts of all processes with gradient (one all-gather, not the paper's
    ring of neighbour exchanges: simpler, at the cost of holding all ``B`` texts at once) and scores its own ``b``
    images against them, logits ``(b, B)``, positives at columns ``rank * b + i``. The mean of the per-process
    losses equals the single-process loss on the global batch (see ``forward``).

    Args:
        rank, world_size: taken from ``torch.distributed`` at each call when None; 0 and 1 without a process group.
        max_logit_scale: clamp of ``logit_scale`` before ``exp`` (None: no clamp; the paper does not clamp).

    Use ``SIGLIP_LOGIT_SCALE_INIT`` (ln 10) and ``SIGLIP_LOGIT_BIAS_INIT`` (-10) to initialise the parameters.
    """

    def __init__(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        max_logit_scale: float | None = MAX_LOGIT_SCALE,
    ):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.max_logit_scale = max_logit_scale

    def get_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        scale: torch.Tensor,
        logit_bias: torch.Tensor | float,
    ) -> torch.Tensor:
        """``scale * image @ all_texts.T + logit_bias`` for L2-normalised ``(b, d)`` features: ``(b, B)``."""
        rank, world_size = resolve_rank_and_world_size(self.rank, self.world_size)
        all_text = all_gather_features(text_features, rank, world_size, with_grad=True)  # (B, d)
        return scale * image_features @ all_text.T + logit_bias  # (b, B)

    @staticmethod
    def get_ground_truth(
        device: torch.device, dtype: torch.dtype, num_rows: int, num_cols: int, offset: int = 0
    ) -> torch.Tensor:
        """``(num_rows, num_cols)`` of -1 with +1 at ``(i, offset + i)``: the positive pair of each image row."""
        labels = torch.full((num_rows, num_cols), -1.0, device=device, dtype=dtype)
        rows = torch.arange(num_rows, device=device)
        labels[rows, rows + offset] = 1.0
        return labels

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss of a batch of pairs: a scalar, or ``{"contrastive_loss": scalar}`` with ``output_dict``.

        ``image_features``, ``text_features``: ``(b, d)``, L2-normalised here. ``logit_scale``: log inverse
        temperature; ``logit_bias``: the learnable bias ``b`` of the paper.

        Each process returns ``-sum_{i local, j global} log sigmoid(z_ij * logit_ij) / b``; the mean of these over
        processes equals the single-process loss on the global batch, ``-sum_{i, j} (...) / B``.
        """
        _check_features(image_features, text_features)
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        scale = _scale(logit_scale, self.max_logit_scale, image_features)

        logits = self.get_logits(image_features, text_features, scale, logit_bias)  # (b, B)
        rank, world_size = resolve_rank_and_world_size(self.rank, self.world_size)
        num_rows, num_cols = logits.shape
        labels = self.get_ground_truth(logits.device, logits.dtype, num_rows, num_cols, offset=rank * num_rows)
        loss = -F.logsigmoid(labels * logits).sum() / num_rows
        return {"contrastive_loss": loss} if output_dict else loss


LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: ``"clip"`` -> ``ClipLoss(**kwargs)``, ``"siglip"`` -> ``SigLipLoss(**kwargs)``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss name={name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)


# --------------------------------------------------------------------------------------------- the autoencoder

RECONSTRUCTION_LOSSES = ("l1", "mse")


class AutoencoderKLLoss(nn.Module):
    """The loss of a KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
    Diffusion Models", sec. 3.1 and appendix G): a pixel reconstruction loss plus a small weight times the KL
    divergence of the diagonal Gaussian posterior from the standard normal, which keeps the latent space from
    growing arbitrary in scale without pushing the codes towards noise.

    LDM sums both terms over each sample's elements (and averages over the batch), with a KL weight of 1e-6. Here
    the reconstruction is a mean over pixels (a loss in pixel units, whatever the resolution) and the KL sum is
    divided by the same number of pixel values, so `kl_weight` means what it means in LDM. LDM's perceptual
    (LPIPS) and adversarial terms are not included.
    """

    def __init__(self, reconstruction: str = "l1", kl_weight: float = 1e-6):
        super().__init__()
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"`reconstruction` must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction!r}")
        if not kl_weight >= 0:
            raise ValueError(f"`kl_weight` must be >= 0, got {kl_weight}")
        self.reconstruction = reconstruction
        self.kl_weight = kl_weight

    def reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean absolute or squared error over all elements, in fp32."""
        if self.reconstruction == "l1":
            return F.l1_loss(reconstruction.float(), target.float())
        return F.mse_loss(reconstruction.float(), target.float())

    @staticmethod
    def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each sample's latent elements: (B,)."""
        mean, logvar = mean.float(), logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)

    def forward(
        self, reconstruction: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`reconstruction`, `target`: (B, 3, H, W); `mean`, `logvar`: the posterior's (B, C, h, w). Returns the
        loss and its two terms for logging (detached; the KL per sample)."""
        rec = self.reconstruction_loss(reconstruction, target)
        kl = self.kl_divergence(mean, logvar).mean()
        loss = rec + self.kl_weight * kl / target[0].numel()  # the KL per pixel value, as `rec` is a mean
        return loss, {"train/reconstruction": rec.detach(), "train/kl": kl.detach()}
