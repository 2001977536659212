"""Peak memory: ``ru_maxrss`` of a fresh process on the CPU, CUDA's allocator on the GPU."""

from __future__ import annotations

import multiprocessing
import resource
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch


def max_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def gpu_peak_bytes(call: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """CUDA memory one call allocates at its peak, above what was allocated before it.

    Args:
        call: The call (warmed up).
        device: The CUDA device.

    Returns:
        ``(peak bytes, the call's output)``.

    Example:
        >>> peak, _ = gpu_peak_bytes(lambda: model(images), torch.device("cuda"))
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    output = call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, output


def _send_result(connection: Connection, function: Callable, args: tuple) -> None:
    """Child side of :func:`run_in_fresh_process`: send the result or the traceback."""
    try:
        result = function(*args)
    except BaseException:  # reported to the parent, which raises it
        connection.send((False, traceback.format_exc()))
    else:
        connection.send((True, result))
    connection.close()


def run_in_fresh_process(
    context: multiprocessing.context.BaseContext, function: Callable, args: tuple
) -> object:
    """``function(*args)`` in a new process of ``context``; its result, or its error raised.

    Args:
        context: A multiprocessing context (``forkserver`` for the benchmark).
        function: A module-level function (picklable by reference).
        args: Its picklable arguments.

    Returns:
        What ``function`` returned.

    Raises:
        RuntimeError: With the child's traceback if it raised, or if it died without an
            answer (e.g. killed for memory).

    Example:
        >>> run_in_fresh_process(multiprocessing.get_context("spawn"), max, (1, 2))
        2
    """
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_result, args=(sender, function, args))
    process.start()
    sender.close()  # the child holds the only sending end: EOF once it is gone
    try:
        ok, result = receiver.recv()
    except EOFError:
        ok, result = False, "the process died without an answer"
    finally:
        process.join()
        receiver.close()
    if not ok:
        raise RuntimeError(
            f"{function.__name__}{args} failed (exit code {process.exitcode}):\n{result}"
        )
    return result
