"""What every `torch.multiprocessing.spawn` worker of the test suite shares."""

from __future__ import annotations

import functools
import os
import sys


def leaves_without_teardown(worker):
    """A spawn worker that, once it returned, leaves its process with os._exit(0): interpreter
    finalization is skipped, where gloo's threads (their process groups still referenced by device
    meshes after destroy_process_group) now and then abort a run that succeeded ("terminate called
    without an active exception", SIGABRT; 2 of ~1,300 multi-process runs on 2 cores). A worker that
    raises still leaves through mp.spawn's error path, so failures are reported as before.

    The library's own exit no longer needs this (ParallelContext.close drops the meshes' groups and
    `smoltrain` collects what still holds one before returning; test_hardening_post.py runs torchrun),
    but these workers build meshes and groups themselves, outside the CLI, and keep it."""

    @functools.wraps(worker)
    def run(*args, **kwargs):
        worker(*args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return run
