"""Checks of the arguments that the pipelines' `check_inputs` share, as diffusers writes them: each user error is a
`ValueError` that names the argument and echoes the value; and the interval of sampling steps that guidance covers.
"""

from __future__ import annotations

from clipcond.finite import is_finite_number

# The image-embedding decoder's guidance starts this far into the sampling steps (`guided_steps`): guided from the
# first, noisiest step, it often washed the object out to the empty background, light colours most (guidance limited
# to an interval of steps: Kynkäänniemi et al. 2024). The Stable Diffusion path lost shape accuracy with it, so the
# text-to-image pipeline guides every step. The measurements are in docs/lab-notes.md.
DEFAULT_GUIDANCE_START = 0.4

# Classifier-free guidance weights of the pipelines, commands and evaluations, by path: the text-to-image decoder's
# (stronger guidance draws more second objects for one-object prompts) and the image-embedding decoder's, guided from
# DEFAULT_GUIDANCE_START on (with the stochastic sampler, stronger guidance leaves more variations blank). Both sweeps
# are in docs/lab-notes.md.
DEFAULT_TEXT_GUIDANCE_SCALE = 3.0
DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE = 3.0

# The prior's classifier-free guidance weight and denoising steps, wherever a prior samples (its pipeline, the
# DALL-E 2 pipelines, the commands and the evaluations).
DEFAULT_PRIOR_GUIDANCE_SCALE = 4.0
DEFAULT_PRIOR_INFERENCE_STEPS = 25


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a step count


def check_prompts(prompt, negative_prompt) -> int:
    """`prompt`: a string or a non-empty list of strings; `negative_prompt`: None, a string for all prompts, or a
    list of one string per prompt. Returns the number of prompts."""
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
    elif not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}: {prompt!r}")
    batch_size = 1 if isinstance(prompt, str) else len(prompt)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError(f"`negative_prompt` must be None, a string or a list of strings, got {negative_prompt!r}")
        if len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}; "
                "give one negative prompt per prompt, or a single string for all"
            )
    return batch_size


def check_sampling_args(
    num_inference_steps,
    guidance_scale,
    num_images_per_prompt,
    generator,
    batch_size: int,
    inputs: str = "prompts",
    output: str = "image",
) -> int:
    """The step count, the guidance weight, the outputs per input and the generator(s) for `batch_size` inputs
    (called `inputs` in messages) making one `output` each per `num_images_per_prompt`. Returns the number of
    outputs, `batch_size * num_images_per_prompt`."""
    check_step_count(num_inference_steps)
    check_guidance_scale(guidance_scale)
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}")
    num_images = batch_size * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators, but {num_images} {output}s are asked for "
            f"({batch_size} {inputs} x {num_images_per_prompt}); give one generator per {output}"
        )
    return num_images


def check_step_count(value, name: str = "num_inference_steps") -> None:
    """A number of denoising steps: an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")


def check_output_type(output_type, output_types: tuple[str, ...]) -> None:
    if output_type not in output_types:
        raise ValueError(f"`output_type` must be one of {list(output_types)}, got {output_type!r}")


def check_latents(latents, expected: tuple[int, ...]) -> None:
    """`latents`: None (drawn by the pipeline) or initial noise of the `expected` shape."""
    if latents is not None and tuple(latents.shape) != expected:
        raise ValueError(f"`latents` must have shape {expected}, got {tuple(latents.shape)}")


def check_guidance_scale(value, name: str = "guidance_scale") -> None:
    """A classifier-free guidance weight: a finite number >= 0 (NaN would pass `< 0` and sample unguided)."""
    if not is_finite_number(value) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0 (finite; 1 or less: no guidance), got {value!r}")


def check_guidance_interval(guidance_start, guidance_end) -> None:
    """`guidance_start` < `guidance_end`, both fractions of the sampling steps in [0, 1] (`guided_steps`)."""
    for name, value in (("guidance_start", guidance_start), ("guidance_end", guidance_end)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be a fraction of the sampling steps in [0, 1], got {value!r}")
    if guidance_start >= guidance_end:
        raise ValueError(
            f"`guidance_start` must be smaller than `guidance_end`, got {guidance_start!r} and {guidance_end!r}"
        )


def guided_steps(num_steps: int, guidance_start: float, guidance_end: float) -> range:
    """The indices of the sampling steps that apply classifier-free guidance: step i of N when
    int(start * N) <= i < int(end * N), counting from the noisiest step, as diffusers' guiders count.

    Guidance limited to an interval (Kynkaenniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models") leaves the noisiest steps to the conditional model alone;
    the others need one UNet batch instead of two."""
    return range(int(guidance_start * num_steps), int(guidance_end * num_steps))
