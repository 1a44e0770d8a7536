"""Reading a pipeline folder that ships its own code, as one of clipcond's pipeline classes.

A run folder carries its pipeline's modules (`clipcond.pipeline_code`) in diffusers' layout for custom code: its
model_index.json names the pipeline as `"_class_name": [entry module, class name]`, and a clipcond model among its
components as `[module, class name]` with that module's file in the component's folder, so that stock diffusers,
without clipcond, loads it with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

diffusers' `from_pretrained` would run that code even when called on a class of ours
(`TextToImagePipeline.from_pretrained(folder)`), and then only with `trust_remote_code`. `ShippedCodeMixin` reads such
a folder's model_index.json as the folders written before any code shipped read: the pipeline is the class it is
called on, and a component of a class that the pipeline's module imports is that class, wherever it was loaded from.
"""

from __future__ import annotations

import sys


class ShippedCodeMixin:
    """Put first among a `DiffusionPipeline`'s bases: `from_pretrained` on the class then loads the class itself and
    its own component classes from a folder that ships their code, without running the folder's copy."""

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs[, commit hash])
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        own_names = vars(sys.modules[cls.__module__])
        for name, entry in config.items():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
                continue
            own = own_names.get(entry[1])
            # A class of ours (not diffusers' nor transformers'), which diffusers finds in `sys.modules` under the
            # module it names: the pipeline's module imported it.
            if isinstance(own, type) and own.__module__.split(".")[0] not in ("diffusers", "transformers"):
                config[name] = [own.__module__, entry[1]]
        return loaded
