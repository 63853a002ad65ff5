"""A folder that appears whole or not at all, for the scripts that fetch and convert models."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside `out` to fill; on success it replaces `out` in one rename.

    Staged on the same filesystem so that the rename is atomic: an interrupted run leaves only a stray
    `.tmp-*` folder, never a half-written `out`. A leftover `out` (from a run that died before its
    caller marked it complete) is replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the final folder should be readable
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
