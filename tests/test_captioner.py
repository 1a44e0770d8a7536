"""The captioner's parts (`clipcond.models.captioner`) at test scale: the projector, the text layout and its labels,
generation (greedy, seeded sampling, batched like one by one), and the saved folder, whose language model loads with
stock transformers."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from clipcond.data.folders import ImageCaptionDataset
from clipcond.models.captioner import (
    IGNORE_INDEX,
    Captioner,
    CaptionerModel,
    VisionProjector,
    prompt_ids,
    target_ids,
    text_batch,
)
from clipcond.models.clip import load_vision_tower
from clipcond.vision_tokens import VisionTokenCache, vision_tokens


@pytest.fixture(scope="module")
def captioner(tiny_captioner):
    return tiny_captioner


def _images(shapes_data, n=3):
    dataset = ImageCaptionDataset(shapes_data, split="test", resolution=32)
    return torch.stack([dataset[i]["pixel_values"] for i in range(n)])  # (n, 3, 32, 32) uint8


def test_projector_makes_one_token_per_patch_and_one_pooled():
    projector = VisionProjector(vision_width=8, embed_dim=6, hidden_size=16)
    tokens = projector(torch.randn(2, 5, 8), torch.randn(2, 6))
    assert tokens.shape == (2, 6, 16)
    assert [type(m).__name__ for m in projector.patch] == ["Linear", "GELU", "Linear"]  # LLaVA-1.5's mlp2x_gelu


def test_vision_tokens_come_from_the_penultimate_layer_without_the_class_token(tiny_clip_run):
    vision, _, _ = load_vision_tower(tiny_clip_run)
    pixels = torch.randn(2, 3, 32, 32)
    patches, embeds = vision_tokens(vision, pixels)
    out = vision(pixel_values=pixels, output_hidden_states=True)
    assert patches.shape == (2, (32 // 8) ** 2, vision.config.hidden_size)
    torch.testing.assert_close(patches, out.hidden_states[-2][:, 1:])
    torch.testing.assert_close(embeds, out.image_embeds)


def test_vision_token_cache_holds_the_towers_tokens(tiny_clip_run, shapes_data, tmp_path):
    vision, mean, std = load_vision_tower(tiny_clip_run)
    dataset = ImageCaptionDataset(shapes_data, split="test", resolution=32)
    cache = VisionTokenCache.build_or_load(vision, dataset, tmp_path, image_mean=mean, image_std=std, progress=False)
    again = VisionTokenCache.build_or_load(vision, dataset, tmp_path, image_mean=mean, image_std=std, progress=False)
    assert len(list(tmp_path.iterdir())) == 1 and again.key == cache.key
    from clipcond.models.clip_pixels import normalize_pixels

    patches, embeds = vision_tokens(vision, normalize_pixels(_images(shapes_data, 2), mean, std))
    got_patches, got_embeds = again.lookup(torch.tensor([0, 1]))
    torch.testing.assert_close(got_patches, patches, atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(got_embeds, embeds, atol=2e-3, rtol=2e-3)


def test_only_the_targets_are_labelled(captioner):
    tok = captioner.tokenizer
    prompts = [prompt_ids(tok, None), prompt_ids(tok, "what shape is it?")]
    targets = [target_ids(tok, "a red circle"), target_ids(tok, "circle")]
    batch = text_batch(prompts, targets, tok.pad_token_id)
    for row, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        labels = batch["labels"][row]
        assert (labels[: len(p)] == IGNORE_INDEX).all() and (labels[len(p) + len(t) :] == IGNORE_INDEX).all()
        assert labels[len(p) : len(p) + len(t)].tolist() == t and t[-1] == tok.eos_token_id
        assert batch["attention_mask"][row].sum() == len(p) + len(t)
    assert prompts[0] == [tok.bos_token_id]
    cut = target_ids(tok, "a red circle " * 20, max_tokens=5)
    assert len(cut) == 5 and cut[:4] == target_ids(tok, "a red circle " * 20)[:4] and cut[-1] == tok.eos_token_id


def test_loss_ignores_the_image_and_prompt_positions(captioner):
    """The loss is the mean cross-entropy over the target tokens (the caption and <eos>) alone."""
    tok, model = captioner.tokenizer, CaptionerModel(captioner.projector, captioner.lm)
    batch = text_batch([prompt_ids(tok, None)], [target_ids(tok, "a red circle")], tok.pad_token_id)
    patches, embeds = torch.randn(1, 16, 32), torch.randn(1, 32)
    loss = model(patches, embeds, **batch)
    inputs, mask = model.inputs(patches, embeds, batch["input_ids"], batch["attention_mask"])
    # 17 image tokens (16 patches + the pooled one): position 16 + j predicts text token j
    logits = captioner.lm(inputs_embeds=inputs, attention_mask=mask).logits[0, 16:-1]
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"][0], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)


def test_generate_greedy_is_deterministic_and_batched_like_single(captioner, shapes_data):
    images = _images(shapes_data)
    prompts = [None, "what shape is it?", "how many objects are there?"]  # prompts of different lengths
    batched = captioner.generate(images, prompts, max_new_tokens=6)
    single = [captioner.generate(images[i : i + 1], prompts[i], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single
    assert captioner.generate(images, prompts, max_new_tokens=6) == batched


def _uncached_greedy(captioner, images, prompt, steps):
    """The greedy tokens of one image, each the argmax of a full forward over the image tokens and all the text so
    far, without a key-value cache."""
    tok, model = captioner.tokenizer, CaptionerModel(captioner.projector, captioner.lm)
    patches, embeds = captioner.image_tokens(images)
    ids = prompt_ids(tok, prompt)
    written = []
    for _ in range(steps):
        input_ids = torch.tensor([ids + written])
        inputs, mask = model.inputs(patches, embeds, input_ids, torch.ones_like(input_ids))
        written.append(int(captioner.lm(inputs_embeds=inputs, attention_mask=mask).logits[0, -1].argmax()))
        if written[-1] == tok.eos_token_id:
            break
    return written


def test_generate_greedy_is_the_argmax_of_the_uncached_forward(captioner, shapes_data):
    """The cached, left-padded decoding writes what step-by-step full forwards would (batched, with prompts of
    different lengths)."""
    captioner = _spread_out(captioner)
    images = _images(shapes_data)
    prompts = [None, "what shape is it?", "how many objects are there?"]
    texts = captioner.generate(images, prompts, max_new_tokens=5)
    tok = captioner.tokenizer
    for i, prompt in enumerate(prompts):
        tokens = _uncached_greedy(captioner, images[i : i + 1], prompt, 5)
        assert len(tokens) == 5 or tokens[-1] == tok.eos_token_id
        expected = tok.decode([t for t in tokens if t != tok.eos_token_id], skip_special_tokens=True).strip()
        assert texts[i] == expected, (i, tokens)
    assert len(set(texts)) > 1


def test_generate_sampled_follows_the_generator(captioner, shapes_data):
    images = _images(shapes_data)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return captioner.generate(images, do_sample=True, max_new_tokens=8, generator=generator)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)  # an untrained model's distribution is near uniform over hundreds of tokens
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        captioner.generate(images, do_sample=True, temperature=0.0)


def _spread_out(captioner):
    """The captioner with a language model of weights far from the near-zero init, so that positions, images and
    earlier tokens matter."""
    torch.manual_seed(0)
    config = LlamaConfig.from_dict({**captioner.lm.config.to_dict(), "initializer_range": 0.5})
    return dataclasses.replace(captioner, lm=LlamaForCausalLM(config).eval())


def test_generate_scored_is_the_mean_log_probability_of_the_uncached_forward(captioner, shapes_data):
    """Per image, the mean log-probability of the tokens written up to and with <eos> (or of all of them when cut
    off), each read off a full forward over the image and all the text before it."""
    captioner = _spread_out(captioner)
    images, tok = _images(shapes_data), captioner.tokenizer
    texts, scores = captioner.generate_scored(images, max_new_tokens=5)
    model = CaptionerModel(captioner.projector, captioner.lm)
    patches, embeds = captioner.image_tokens(images)
    for i in range(3):
        tokens = _uncached_greedy(captioner, images[i : i + 1], None, 5)
        input_ids = torch.tensor([prompt_ids(tok, None) + tokens])
        inputs, mask = model.inputs(patches[i : i + 1], embeds[i : i + 1], input_ids, torch.ones_like(input_ids))
        logits = captioner.lm(inputs_embeds=inputs, attention_mask=mask).logits[0, -len(tokens) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None]).mean()
        torch.testing.assert_close(scores[i], expected, atol=1e-4, rtol=1e-4)
    assert texts == captioner.generate(images, max_new_tokens=5)


def test_best_of_keeps_the_candidate_likeliest_per_token(captioner, shapes_data):
    """The greedy text and `best_of` - 1 samples from the generator; per image the one of highest log-probability
    per token; `best_of=1` is greedy decoding."""
    captioner = _spread_out(captioner)
    images = _images(shapes_data, 4)
    options = {"max_new_tokens": 6, "temperature": 0.7}
    best = captioner.generate_best_of(images, best_of=8, generator=torch.Generator().manual_seed(0), **options)

    generator = torch.Generator().manual_seed(0)
    candidates = [captioner.generate_scored(images, max_new_tokens=6)]
    for _ in range(7):
        candidates.append(captioner.generate_scored(images, do_sample=True, generator=generator, **options))
    scores = torch.stack([per_token for _, per_token in candidates])
    assert best == [candidates[k][0][row] for row, k in enumerate(scores.argmax(dim=0).tolist())]
    assert any(best[row] != candidates[0][0][row] for row in range(4))  # a sample beat the greedy text somewhere
    assert captioner.generate_best_of(images, best_of=1, max_new_tokens=6) == candidates[0][0]
    with pytest.raises(ValueError, match="`best_of` must be >= 1, got 0"):
        captioner.generate_best_of(images, best_of=0)
    with pytest.raises(ValueError, match="`temperature` must be > 0 to sample the candidates, got 0"):
        captioner.generate_best_of(images, best_of=2, temperature=0)


def test_saved_folder_round_trips_and_lm_loads_with_stock_transformers(captioner, shapes_data, tmp_path):
    captioner.save_pretrained(tmp_path)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    ids = tokenizer("a red circle", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(lm(ids).logits, captioner.lm(ids).logits)
    assert tokenizer("a red circle")["input_ids"] == captioner.tokenizer("a red circle")["input_ids"]
    loaded = Captioner.from_pretrained(tmp_path)
    images = _images(shapes_data)
    assert loaded.generate(images, max_new_tokens=6) == captioner.generate(images, max_new_tokens=6)


def test_from_pretrained_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="`--model` folder .*nowhere.* does not exist"):
        Captioner.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="`--model` .* is not a captioner folder"):
        Captioner.from_pretrained(tmp_path)


@pytest.mark.parametrize("side", [16, 48])
def test_tensor_images_of_another_side_are_resized_to_the_towers(captioner, shapes_data, side):
    """A 32 px CLIP's captioner reads uint8 tensors of any side (`clipcond probe --captioner` passes the data's)."""
    dataset = ImageCaptionDataset(shapes_data, split="test", resolution=side)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(2)])  # (2, 3, side, side) uint8
    assert captioner.pixels(images).shape == (2, 3, 32, 32)
    assert captioner.pixels(list(images)).shape == (2, 3, 32, 32)
    assert len(captioner.generate(images, max_new_tokens=2)) == 2
    assert captioner.pixels(_images(shapes_data)).equal(_images(shapes_data))  # at the tower's side: unchanged


def test_generate_refuses_to_run_past_a_learned_position_table(captioner, shapes_data):
    """A GPT-2 of 32 positions after 17 image tokens and <bos>: 15 new tokens reach its last position (the last one
    written is never read back), 16 would index past the table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=len(captioner.tokenizer))
    lm = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # a zero logit for <eos>, below the largest of the others: every row writes all its tokens
        lm.get_output_embeddings().weight[captioner.tokenizer.eos_token_id] = 0
    projector = VisionProjector.from_config({**captioner.projector.config, "hidden_size": 16}).eval()
    gpt2 = dataclasses.replace(captioner, lm=lm, projector=projector)
    images = _images(shapes_data, 2)
    assert all(len(t.split()) > 0 for t in gpt2.generate(images, max_new_tokens=15))
    with pytest.raises(ValueError, match=r"`max_new_tokens` 16 runs past the language model's 32 positions .* <= 15"):
        gpt2.generate(images, max_new_tokens=16)
    # a question that fills the positions itself: its length is the trouble, not max_new_tokens
    with pytest.raises(
        ValueError, match=r"the image and prompt tokens \(\d+\) fill the language model's 32 positions"
    ):
        gpt2.generate(images, "what shape is it? " * 10, max_new_tokens=1)


def test_the_caption_command_names_its_flag_when_tokens_run_past_the_positions(captioner_run, shapes_data, capsys):
    from clipcond import cli

    image = str(sorted((shapes_data / "test").glob("*.png"))[0])
    argv = ["ask", "--model", str(captioner_run), image, "what shape is it?", "--max-new-tokens", "100"]
    assert cli.main(argv) != 0
    assert "`--max-new-tokens` 100 runs past the language model's 64 positions" in capsys.readouterr().err


def test_non_square_tensors_are_centre_cropped_not_squashed():
    from clipcond.models.clip_pixels import resize_images

    wide = torch.zeros(1, 3, 32, 64, dtype=torch.uint8)
    wide[:, 2] = 255  # blue everywhere ...
    wide[:, :, :, :8] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]  # ... but red at both ends
    wide[:, :, :, 56:] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    out = resize_images(wide, 16)
    assert out.shape == (1, 3, 16, 16)
    assert (out[0, 0] == 0).all() and (out[0, 2] == 255).all()  # the centre square: blue, no red squashed in
    tall = wide.transpose(-1, -2)
    assert torch.equal(resize_images(tall, 16), out.transpose(-1, -2))
    square = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert resize_images(square, 16) is square
