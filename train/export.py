"""Writing the trained adapter: PEFT's own files, checked by the server's own validation, renamed into place.

The folder is built under a hidden temporary name beside the output (the server's adapter scan skips names that
start with a dot) and renamed to the output only once ``read_adapter`` has accepted it, so a server watching the
adapter directory never sees a half-written or unservable adapter.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..adapters.peft_format import BaseModelInfo, read_adapter
from .report import write_report

log = logging.getLogger("loradock.train")

SERVER_DEFAULT_MAX_RANK = 64  # `loradock serve --max-lora-rank` default


def write_adapter(model, output: Path, base: BaseModelInfo, report: dict) -> Path:
    """Save the peft model's adapter (safetensors) and the report into `output`; raise AdapterError if the server
    would refuse it, leaving `output` untouched."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.writing-", dir=output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        adapter = read_adapter(staging, base, max_rank=max(SERVER_DEFAULT_MAX_RANK, report["lora"]["rank"]),
                               name=output.name)
        if adapter.max_rank > SERVER_DEFAULT_MAX_RANK:
            log.warning("rank %d is above the server's default limit: serve it with --max-lora-rank %d",
                        adapter.max_rank, adapter.max_rank)
        report["adapter_sha256"] = adapter.sha256
        write_report(report, staging)
        _set_default_permissions(staging)
        os.rename(staging, output)  # fails, keeping both, if something else created `output` meanwhile
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _set_default_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private; give it, and the files in it, the modes the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
