import math

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_in_processes

from clipcond.loss import (
    CLIP_LOGIT_SCALE_INIT,
    MAX_LOGIT_SCALE,
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    ClipLoss,
    SigLipLoss,
    all_gather_features,
    all_gather_rows,
    create_loss,
)

# ---------------------------------------------------------------------------------------------------------------
# references written out with Python loops (not the formula the module uses)


def _unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = x.tolist()
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]


def _scaled_cosines(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> list[list[float]]:
    img, txt = _unit_rows(image), _unit_rows(text)
    scale = math.exp(min(logit_scale, math.log(100)))
    return [[scale * sum(a * b for a, b in zip(img_i, txt_j)) for txt_j in txt] for img_i in img]


def _reference_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> float:
    sim = _scaled_cosines(image, text, logit_scale)  # sim[i][j]: image i, text j
    n = len(sim)
    image_to_text = sum(math.log(sum(math.exp(sim[i][j]) for j in range(n))) - sim[i][i] for i in range(n)) / n
    text_to_image = sum(math.log(sum(math.exp(sim[i][j]) for i in range(n))) - sim[j][j] for j in range(n)) / n
    return (image_to_text + text_to_image) / 2


def _reference_negclip_loss(image, text, negatives, logit_scale: float) -> float:
    """NegCLIP written out: image i's softmax runs over the n captions and the negatives; text j's over the images."""
    sim = _scaled_cosines(image, torch.cat([text, negatives]), logit_scale)  # sim[i][j]: image i, text or negative j
    n, columns = len(sim), len(sim[0])
    image_to_text = sum(math.log(sum(math.exp(sim[i][j]) for j in range(columns))) - sim[i][i] for i in range(n)) / n
    text_to_image = sum(math.log(sum(math.exp(sim[i][j]) for i in range(n))) - sim[j][j] for j in range(n)) / n
    return (image_to_text + text_to_image) / 2


def _reference_siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float, logit_bias: float) -> float:
    sim = _scaled_cosines(image, text, logit_scale)
    n = len(sim)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-label * (sim[i][j] + logit_bias))))
    return total / n


# ---------------------------------------------------------------------------------------------------------------
# single process


def test_clip_loss_closed_form_on_unit_axes():
    # logits = I (scale 1): each row's CE is -log(e / (e + 1)) = log(1 + 1/e)
    eye = torch.eye(2)
    loss = ClipLoss()(eye, eye, torch.tensor(0.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_clip_loss_matches_loops():
    g = torch.Generator().manual_seed(0)
    image, text = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    for logit_scale in (0.0, 1.3, CLIP_LOGIT_SCALE_INIT):
        loss = ClipLoss()(image, text, torch.tensor(logit_scale, dtype=torch.float64))
        assert loss.item() == pytest.approx(_reference_clip_loss(image, text, logit_scale), abs=1e-10)


def test_clip_loss_normalises_features_and_takes_float_scale():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss_fn = ClipLoss()
    expected = loss_fn(image, text, torch.tensor(2.0))
    torch.testing.assert_close(loss_fn(3.0 * image, 0.5 * text, 2.0), expected)
    assert loss_fn(image, text, 2.0, output_dict=True)["contrastive_loss"].item() == pytest.approx(expected.item())


def test_clip_loss_aligned_near_zero_shuffled_and_uninformative():
    n = 8
    features = torch.eye(n)  # orthonormal: off-diagonal cosines are exactly 0
    loss_fn = ClipLoss()
    aligned = loss_fn(features, features, MAX_LOGIT_SCALE)  # log(1 + 7 e^-100)
    assert aligned.item() < 1e-6
    # no signal in the logits (scale ~ 0): chance level, ln N
    uninformative = loss_fn(features, features[torch.randperm(n)], -20.0)
    assert uninformative.item() == pytest.approx(math.log(n), abs=1e-6)
    # a derangement at a large scale is confidently wrong: each row puts 100 on a wrong column, far above ln N
    deranged = loss_fn(features, features.roll(1, dims=0), MAX_LOGIT_SCALE)
    assert deranged.item() == pytest.approx(100.0, abs=1e-3)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_logit_scale_clamped_at_ln_100(loss_name):
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    loss_fn = create_loss(loss_name)
    extra = (torch.tensor(SIGLIP_LOGIT_BIAS_INIT),) if loss_name == "siglip" else ()

    def loss_and_grad(value: float) -> tuple[float, float]:
        logit_scale = torch.tensor(value, requires_grad=True)
        loss = loss_fn(image, text, logit_scale, *extra)
        loss.backward()
        return loss.item(), logit_scale.grad.item()

    at_max, _ = loss_and_grad(MAX_LOGIT_SCALE)
    above, above_grad = loss_and_grad(MAX_LOGIT_SCALE + 1.0)
    _, below_grad = loss_and_grad(CLIP_LOGIT_SCALE_INIT)
    assert above == at_max
    assert above_grad == 0.0
    assert below_grad != 0.0


def test_clip_loss_without_negatives_is_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)

    def loss_and_grads(**negatives):
        x, y = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        loss = ClipLoss()(x, y, torch.tensor(1.5), **negatives)
        loss.backward()
        return loss.detach(), x.grad, y.grad

    plain = loss_and_grads()
    for negatives in ({"negative_features": None}, {"negative_features": torch.zeros(0, 8)}):
        for got, expected in zip(loss_and_grads(**negatives), plain, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_clip_loss_with_negatives_matches_loops_and_trains_the_negatives():
    g = torch.Generator().manual_seed(2)
    image, text, negatives = (torch.randn(n, 8, generator=g) for n in (5, 5, 3))
    x, y, z = (t.clone().requires_grad_(True) for t in (image, text, negatives))
    loss = ClipLoss()(x, y, torch.tensor(1.2), negative_features=z)
    assert loss.item() == pytest.approx(_reference_negclip_loss(image, text, negatives, 1.2), abs=1e-5)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the negatives' text features are trained
    with pytest.raises(ValueError, match=r"negative_features must have shape \(num_negatives, 8\).*\(3, 4\)"):
        ClipLoss()(image, text, 1.0, negative_features=torch.zeros(3, 4))


def test_a_negative_equal_to_the_caption_raises_the_image_to_text_term_by_its_share():
    """A negative that is a copy of caption 0 adds exp(s_i0) once more to every image i's softmax denominator Z_i
    (image 0's positive score among them): the image->text term grows by sum_i log(1 + exp(s_i0) / Z_i) / b and the
    text->image term not at all, so the loss grows by half of that. A negative opposite to the images adds less."""
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    loss = ClipLoss()
    plain = loss(image, text, 2.0)
    copy = loss(image, text, 2.0, negative_features=text[:1].clone())
    logits = math.exp(2.0) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # (4, 4)
    shares = logits[:, 0].exp() / logits.exp().sum(dim=1)  # (4,): exp(s_i0) / Z_i
    assert (copy - plain).item() == pytest.approx(shares.log1p().mean().item() / 2, rel=1e-4)
    assert copy > plain
    far = loss(image, text, 2.0, negative_features=-image.sum(0, keepdim=True))
    assert far - plain < copy - plain


def _reference_pair_terms(image, text, pairs, logit_scale: float) -> list[float]:
    """Each pair (a, b) written out: image a picks caption a over b, image b caption b over a, caption a picks image a
    over b, caption b image b over a; the mean of the four two-way cross-entropies."""
    sim = _scaled_cosines(image, text, logit_scale)  # sim[i][j]: image i, text j

    def pick(own, other):
        return math.log(math.exp(own) + math.exp(other)) - own

    return [
        (
            pick(sim[a][a], sim[a][b])
            + pick(sim[b][b], sim[b][a])
            + pick(sim[a][a], sim[b][a])
            + pick(sim[b][b], sim[a][b])
        )
        / 4
        for a, b in pairs
    ]


def test_the_pair_term_adds_each_pairs_two_way_losses_as_rows_of_the_batch():
    g = torch.Generator().manual_seed(4)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    pairs = torch.tensor([[0, 4], [2, 5], [1, 3]])
    plain = ClipLoss()(image, text, 1.3)
    weighted = ClipLoss(pair_weight=2.5)(image, text, 1.3, pairs=pairs)
    terms = _reference_pair_terms(image, text, pairs.tolist(), 1.3)
    assert (weighted - plain).item() == pytest.approx(2.5 * sum(terms) / 6, rel=1e-5)
    # weight 0 (the default) ignores the pairs; no pairs (or none this batch) add nothing
    for loss in (ClipLoss()(image, text, 1.3, pairs=pairs), ClipLoss(pair_weight=2.5)(image, text, 1.3)):
        assert loss.item() == plain.item()
    empty = ClipLoss(pair_weight=2.5)(image, text, 1.3, pairs=torch.zeros(0, 2, dtype=torch.long))
    assert empty.item() == pytest.approx(plain.item(), abs=1e-7)
    with pytest.raises(ValueError, match="`pair_weight` must be >= 0, got -1"):
        ClipLoss(pair_weight=-1)


def test_pair_weights_weigh_each_pair_on_its_own_in_place_of_pair_weight():
    g = torch.Generator().manual_seed(6)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    pairs = torch.tensor([[0, 4], [2, 5], [1, 3]])
    plain = ClipLoss()(image, text, 1.3)
    terms = _reference_pair_terms(image, text, pairs.tolist(), 1.3)
    weights = torch.tensor([16.0, 0.0, 4.0])
    for pair_weight in (0.0, 8.0):  # replaced, and the term on even where the loss's own weight is 0
        loss = ClipLoss(pair_weight=pair_weight)(image, text, 1.3, pairs=pairs, pair_weights=weights)
        assert (loss - plain).item() == pytest.approx((16 * terms[0] + 4 * terms[2]) / 6, rel=1e-5)
    same = ClipLoss()(image, text, 1.3, pairs=pairs, pair_weights=torch.full((3,), 2.5))
    assert same.item() == pytest.approx(ClipLoss(pair_weight=2.5)(image, text, 1.3, pairs=pairs).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"pair_weights must have shape \(num_pairs,\) = \(3,\).*got \(2,\)"):
        ClipLoss()(image, text, 1.3, pairs=pairs, pair_weights=weights[:2])


def test_a_pair_alike_in_pixels_and_words_costs_log_2_and_different_images_train_captions_apart():
    """Twins that neither tower tells apart: each of the four choices is a coin toss (log 2). Where the images differ
    but the captions do not (the text tower does not read the change yet), the gradient moves the captions apart."""
    g = torch.Generator().manual_seed(5)
    image, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    image[1], text[1] = image[0], text[0]
    pairs = torch.tensor([[0, 1]])
    extra = ClipLoss(pair_weight=1.0)(image, text, 2.0, pairs=pairs) - ClipLoss()(image, text, 2.0)
    assert extra.item() == pytest.approx(math.log(2) / 4, rel=1e-5)

    image[1] = torch.randn(8, generator=g)
    y = text.clone().requires_grad_(True)
    ClipLoss(pair_weight=1.0).pair_losses(
        F.normalize(image, dim=-1), F.normalize(y, dim=-1), 2.0, pairs
    ).sum().backward()
    step = F.normalize(y.detach() - 2.0 * y.grad, dim=-1)
    assert F.cosine_similarity(step[0], step[1], dim=0) < 1 - 1e-4
    sim = F.normalize(image[:2], dim=-1) @ step[:2].T  # (image, caption) of the pair after the step
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]  # each image now prefers its own caption


def test_clip_labels_cached_per_device_and_size():
    loss_fn = ClipLoss()
    labels = loss_fn.get_ground_truth(torch.device("cpu"), 4)
    assert loss_fn.get_ground_truth(torch.device("cpu"), 4) is labels
    torch.testing.assert_close(loss_fn.get_ground_truth(torch.device("cpu"), 3, offset=6), torch.tensor([6, 7, 8]))


def test_siglip_loss_closed_form_and_loops():
    # logits = I (scale 1, bias 0): 2 positives at 1 -> -log sigmoid(1); 2 negatives at 0 -> log 2; divided by n = 2
    eye = torch.eye(2)
    loss = SigLipLoss()(eye, eye, 0.0, 0.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + math.log(2), abs=1e-6)

    g = torch.Generator().manual_seed(3)
    image, text = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    for logit_scale, logit_bias in ((0.0, 0.0), (SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT), (4.0, -2.5)):
        loss = SigLipLoss()(image, text, torch.tensor(logit_scale, dtype=torch.float64), torch.tensor(logit_bias))
        assert loss.item() == pytest.approx(_reference_siglip_loss(image, text, logit_scale, logit_bias), abs=1e-10)


def test_create_loss_and_argument_errors():
    assert isinstance(create_loss("clip", local_loss=False), ClipLoss)
    assert isinstance(create_loss("siglip"), SigLipLoss)
    with pytest.raises(ValueError, match=r"'infonce'.*\['clip', 'siglip'\]"):
        create_loss("infonce")
    with pytest.raises(ValueError, match=r"image_features \(4, 3\) and text_features \(4, 5\)"):
        ClipLoss()(torch.randn(4, 3), torch.randn(4, 5), 0.0)
    with pytest.raises(ValueError, match="world_size=2 needs an initialised"):
        ClipLoss(world_size=2, rank=0)(torch.randn(4, 3), torch.randn(4, 3), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# two processes against one

GLOBAL_BATCH, DIM, WORLD_SIZE = 8, 16, 2
LOSS_CONFIGS = {
    # name: (factory name, kwargs, logit_scale, logit_bias or None, with hard negatives)
    "clip": ("clip", {}, CLIP_LOGIT_SCALE_INIT, None, False),
    "clip_global_logits": ("clip", {"local_loss": False}, CLIP_LOGIT_SCALE_INIT, None, False),
    "clip_gather_without_grad": ("clip", {"gather_with_grad": False}, CLIP_LOGIT_SCALE_INIT, None, False),
    "siglip": ("siglip", {}, SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT, False),
    "clip_negatives": ("clip", {}, CLIP_LOGIT_SCALE_INIT, None, True),
    "clip_negatives_global_logits": ("clip", {"local_loss": False}, CLIP_LOGIT_SCALE_INIT, None, True),
    "clip_pairs": ("clip", {"pair_weight": 2.0}, CLIP_LOGIT_SCALE_INIT, None, True),
    "clip_pairs_global_logits": ("clip", {"pair_weight": 2.0, "local_loss": False}, CLIP_LOGIT_SCALE_INIT, None, True),
    "clip_pair_weights": ("clip", {}, CLIP_LOGIT_SCALE_INIT, None, True),  # `PAIR_WEIGHTS` per pair
}
# Pairs of rows that are each other's twins (the pair term), each within one process's rows, even split or uneven
PAIRS = [(0, 1), (2, 0), (5, 7)]
PAIR_WEIGHTS = [4.0, 0.0, 1.5]  # each pair's own weight, in "clip_pair_weights"
# The rows of the global batch that have a hard negative: 3 on rank 0, 1 on rank 1 (the counts differ)
NEGATIVE_ROWS = [0, 1, 2, 5]
# `uneven=True`: rank 0 holds the first UNEVEN_SPLIT pairs, rank 1 the others (counterfactual pairs join some batches)
UNEVEN_SPLIT = 3
UNEVEN_CONFIGS = (
    "clip",
    "clip_global_logits",
    "clip_negatives",
    "clip_pairs",
    "clip_pairs_global_logits",
    "clip_pair_weights",
)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(GLOBAL_BATCH, DIM, generator=g)
    text = image + 0.8 * torch.randn(GLOBAL_BATCH, DIM, generator=g)  # related pairs, so the loss is not trivial
    negatives = text[NEGATIVE_ROWS] + 0.5 * torch.randn(len(NEGATIVE_ROWS), DIM, generator=g)  # near their captions
    return image, text, negatives


def _own_pairs(rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of `PAIRS` within `rows` of the global batch, as local rows, and their `PAIR_WEIGHTS`."""
    own = [k for k, (a, _) in enumerate(PAIRS) if a in rows]
    pairs = torch.tensor([[a - rows.start, b - rows.start] for a, b in (PAIRS[k] for k in own)], dtype=torch.long)
    return pairs.reshape(-1, 2), torch.tensor([PAIR_WEIGHTS[k] for k in own])


def _loss_and_grads(
    config: str,
    image: torch.Tensor,
    text: torch.Tensor,
    negatives: torch.Tensor,
    uneven: bool = False,
    rows: range = range(GLOBAL_BATCH),
) -> dict[str, torch.Tensor]:
    name, kwargs, scale_value, bias_value, with_negatives = LOSS_CONFIGS[config]
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    negatives = negatives.clone().requires_grad_(True)
    logit_scale = torch.tensor(scale_value, requires_grad=True)
    bias = () if bias_value is None else (torch.tensor(bias_value, requires_grad=True),)
    extra = {"negative_features": negatives} if with_negatives else {}
    if uneven:
        extra["uneven"] = True
    pairs, weights = _own_pairs(rows)
    if kwargs.get("pair_weight"):
        extra["pairs"] = pairs
    elif config == "clip_pair_weights":
        extra.update(pairs=pairs, pair_weights=weights)
    loss = create_loss(name, **kwargs)(image, text, logit_scale, *bias, **extra)
    loss.backward()
    out = {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": logit_scale.grad}
    if bias:
        out["bias_grad"] = bias[0].grad
    if with_negatives:
        out["negative_grad"] = negatives.grad
    return out


def _worker(rank: int, world_size: int) -> dict:
    image, text, negatives = _global_batch()
    local = GLOBAL_BATCH // world_size
    rows = range(rank * local, (rank + 1) * local)
    own = [k for k, row in enumerate(NEGATIVE_ROWS) if row in rows]
    results = {
        config: _loss_and_grads(
            config, image[rows.start : rows.stop], text[rows.start : rows.stop], negatives[own], rows=rows
        )
        for config in LOSS_CONFIGS
    }
    rows = range(0, UNEVEN_SPLIT) if rank == 0 else range(UNEVEN_SPLIT, GLOBAL_BATCH)
    own = [k for k, row in enumerate(NEGATIVE_ROWS) if row in rows]
    for config in UNEVEN_CONFIGS:
        local_rows = (image[rows.start : rows.stop], text[rows.start : rows.stop], negatives[own])
        results[f"{config}_uneven"] = _loss_and_grads(config, *local_rows, uneven=True, rows=rows)

    # all_gather's backward: rank r's loss is (r + 1) * sum_k (k + 1) * gathered_k, so the gradient on rank r's
    # input is (r + 1) * 3 if the backward sums the ranks' gradients, (r + 1) ** 2 if it kept only the local one.
    for with_grad in (True, False):
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = all_gather_features(x, rank, world_size, with_grad=with_grad).chunk(world_size)
        ((rank + 1) * sum((k + 1) * chunk.sum() for k, chunk in enumerate(gathered))).backward()
        results[f"all_gather_with_grad={with_grad}"] = {"value": torch.cat(gathered).detach(), "grad": x.grad}
    # rows of different counts (rank r holds r + 1 rows of value r + 1; none when every process has none)
    y = torch.full((rank + 1, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_rows(y, rank, world_size)
    (gathered * torch.arange(1, gathered.shape[0] + 1).unsqueeze(1)).sum().backward()
    empty = all_gather_rows(torch.zeros(0, 3), rank, world_size)
    results["all_gather_rows"] = {"value": gathered.detach(), "grad": y.grad, "empty": torch.tensor(empty.shape)}
    return results


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    return run_in_processes(_worker, WORLD_SIZE)


def test_all_gather_backward_sums_gradients_over_ranks(two_process_results):
    for rank, result in enumerate(two_process_results):
        with_grad, without_grad = result["all_gather_with_grad=True"], result["all_gather_with_grad=False"]
        torch.testing.assert_close(with_grad["value"], torch.tensor([1.0] * 6 + [2.0] * 6).reshape(4, 3))
        torch.testing.assert_close(with_grad["grad"], torch.full((2, 3), 3.0 * (rank + 1)))
        torch.testing.assert_close(without_grad["grad"], torch.full((2, 3), float((rank + 1) ** 2)))


def test_all_gather_rows_takes_different_counts(two_process_results):
    for rank, result in enumerate(two_process_results):
        gathered = result["all_gather_rows"]
        torch.testing.assert_close(gathered["value"], torch.tensor([[1.0] * 3, [2.0] * 3, [2.0] * 3]))
        # each row's weight is its place 1..3 in the gathered rows; the backward sums the 2 processes' gradients
        places = torch.arange(1.0, 2.0) if rank == 0 else torch.arange(2.0, 4.0)
        torch.testing.assert_close(gathered["grad"], 2 * places.unsqueeze(1).expand(-1, 3))
        assert gathered["empty"].tolist() == [0, 3]


@pytest.mark.parametrize(
    "config",
    [
        "clip",
        "clip_global_logits",
        "siglip",
        "clip_negatives",
        "clip_negatives_global_logits",
        "clip_pairs",
        "clip_pairs_global_logits",
        "clip_pair_weights",
        *(f"{config}_uneven" for config in UNEVEN_CONFIGS),
    ],
)
def test_two_processes_match_one(two_process_results, config):
    """Also when the processes hold 3 and 5 pairs (`uneven`): each row weighs 1/8 of the global batch, not 1/3 or
    1/5 of its own."""
    per_rank = [result[config] for result in two_process_results]
    config = config.removesuffix("_uneven")
    reference = _loss_and_grads(config, *_global_batch())
    tol = {"atol": 1e-5, "rtol": 1e-5}
    # (a) the mean of the per-process losses is the loss on the whole batch
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), reference["loss"], **tol)
    # (b) feature gradients, divided by the world size as DDP's gradient averaging does, are the global rows'
    for key in (
        ("image_grad", "text_grad", "negative_grad") if LOSS_CONFIGS[config][4] else ("image_grad", "text_grad")
    ):
        torch.testing.assert_close(torch.cat([r[key] for r in per_rank]) / WORLD_SIZE, reference[key], **tol)
    # (c) each process has its own copy of logit_scale (and logit_bias): DDP averages their gradients
    for key in ("scale_grad", "bias_grad") if config == "siglip" else ("scale_grad",):
        torch.testing.assert_close(sum(r[key] for r in per_rank) / WORLD_SIZE, reference[key], **tol)


def test_gather_without_grad_gives_same_loss(two_process_results):
    reference = _loss_and_grads("clip_gather_without_grad", *_global_batch())
    losses = torch.stack([result["clip_gather_without_grad"]["loss"] for result in two_process_results])
    torch.testing.assert_close(losses.mean(), reference["loss"], atol=1e-5, rtol=1e-5)
