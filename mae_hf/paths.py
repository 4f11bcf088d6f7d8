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


def check_output_folder(path: str, option: str = "--output_dir", give: str = "a folder path (created if missing)",
                        writable: bool = True) -> str:
    """Before any work: `path` must be a folder, or creatable below its nearest existing (and, `writable`, writable)
    folder, which is returned; a `UsageError` naming `option` otherwise."""
    from .cli import UsageError  # imported here: this module depends on nothing of ours at import time

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} is a file, not a folder. Give {give}.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # created below its nearest existing ancestor
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder. Give {give}.")
    if writable:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        if read_only or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: {existing} cannot be written "
                             f"({'a read-only file system' if read_only else 'no permission'}). Choose a folder you "
                             "can write to.")
    return existing
