"""clipcond: pretrain a CLIP, freeze it, and condition diffusers UNets on it.

The top-level package stays light (no torch import) so that `clipcond --help` answers at once; import the
submodules you need (`clipcond.models.clip`, `clipcond.loss`, `clipcond.pipelines`, ...).
"""

__version__ = "0.1.0"
