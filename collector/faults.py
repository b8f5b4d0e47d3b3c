"""Fault injection for the reliability tests (off unless its environment variables are set).

- TENSORTAP_FAULT_STALL_WRITES=FLAG: while the file FLAG exists, every data write waits.
- TENSORTAP_FAULT_ENOSPC=FLAG: while FLAG exists, every data write fails with ENOSPC after
  writing half its bytes (the worst case: a torn record the store must cut back).
Flag files let a test switch a fault on and off in a running collector subprocess.
"""
from __future__ import annotations

import errno
import os
import time


def install() -> bool:
    stall = os.environ.get("TENSORTAP_FAULT_STALL_WRITES")
    enospc = os.environ.get("TENSORTAP_FAULT_ENOSPC")
    if not (stall or enospc):
        return False
    from collector import ingest

    real = ingest.write_fn

    def faulty_write(fd: int, data) -> int:
        while stall and os.path.exists(stall):
            time.sleep(0.01)
        if enospc and os.path.exists(enospc):
            half = len(data) // 2
            if half:
                os.write(fd, bytes(data[:half]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    ingest.write_fn = faulty_write
    return True
