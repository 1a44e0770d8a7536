"""Reading a pipeline folder that ships its own code, as one of clipcond's pipeline classes.

A run folder carries its pipeline's modules (`clipcond.pipeline_code`) in diffusers' layout for custom code: its
model_index.json names the pipeline as `"_class_name": [entry module, class name]`, and a clipcond model among its
components as `[entry module, class name]` with the module's file in the component's folder, so that stock
diffusers, without clipcond, loads it with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. The
components' clipcond entries are kept under `SHIPPED_COMPONENTS` (diffusers leaves out keys that start with `_`).

diffusers' `from_pretrained` would run the folder's code even when called on a class of ours
(`TextToImagePipeline.from_pretrained(folder)`), and then only with `trust_remote_code`. `ShippedCodeMixin` reads such
a folder's model_index.json as the folders written before any code shipped read: the pipeline is the class it is
called on, and each clipcond component is its class in the installed clipcond.
"""

from __future__ import annotations

import importlib

SHIPPED_COMPONENTS = "_clipcond_components"  # {component: [clipcond module, class name]}


class ShippedCodeMixin:
    """Put first among a `DiffusionPipeline`'s bases: `from_pretrained` on the class then loads the class itself and
    clipcond's component classes from a folder that ships their code, without running the folder's copy."""

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs[, commit hash])
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        for name, (module, class_name) in config.pop(SHIPPED_COMPONENTS, {}).items():
            # diffusers finds a component of another library in `sys.modules` only, so the module is imported here;
            # where clipcond is not installed (this class is a folder's copy), the folder's code stays the one to run.
            try:
                importlib.import_module(module)
            except ImportError:
                continue
            config[name] = [module, class_name]
        return loaded
