"""Paths a user names on the command line: was a missing name meant as a local path, and what lies next to it (for
error messages). Imported by the data, model-input and publishing code alike, so it depends on nothing of ours."""

import os


def looks_local(path: str) -> bool:
    """Whether a name that does not exist here was meant as a local path rather than a Hub id: it says so
    (./, /, ~), has more than one slash, or its folder exists here (a typo in `runs/mea`)."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def folder_listing(path: str) -> str:
    """What exists next to a missing path, for error messages."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    if not os.path.isdir(parent):
        return f"Its folder {parent} does not exist either."
    entries = sorted(os.listdir(parent))
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} in all)" if len(entries) > 20 else "")
    return f"{parent} holds: {shown or 'nothing'}."
