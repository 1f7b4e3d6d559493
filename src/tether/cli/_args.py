"""Argument types shared by several subcommands."""

from __future__ import annotations

import argparse

__all__ = ["label"]


def label(text: str) -> tuple[str, str]:
    """``--label name=value``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"labels are name=value, not {text!r}")
    return name, value
