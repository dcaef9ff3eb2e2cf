"""The ``--help`` formatter every command uses: each flag's default, printed once.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: X)`` to every flag, so a
flag whose help already says what happens when it is left out (``(default: $FL_SECRET)``)
printed two defaults, the second a bare ``None``. Here a help text that names its default
keeps it, an on/off switch (default False) and a flag left unset (None) say nothing more,
and every other flag gets its actual value appended.
"""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def add_secret_arguments(group: argparse._ActionsContainer, holding: str, unset: str) -> None:
    """``--secret-file`` and ``--secret``, one of them: the file is the way to pass a secret,
    the value shows in the process list. ``holding`` says whose secret the file holds,
    ``unset`` what happens with neither (and no $FL_SECRET)."""
    secret = group.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", default=None, metavar="PATH",
                        help=f"file holding {holding} (default: $FL_SECRET{unset})")
    secret.add_argument("--secret", default=None,
                        help="the secret itself: visible to other users in the process list, "
                             "so prefer --secret-file or $FL_SECRET")
