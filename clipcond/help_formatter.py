"""The `--help` formatter of the commands' argparse parsers (training, data conversion, the demo)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends "(default: X)" to an option's help, except where there is nothing to show
    (X is None: the help says what happens then) or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)
