"""Memory budgeting: estimate before allocating, chunk the directions, or refuse clearly."""

from __future__ import annotations

import os

import torch

# Share of the free memory a derivative computation may plan to use.
BUDGET_FRACTION = 0.8
_REMEDY = ("Reduce the order or the input size, or leave mode='auto' so the planner picks a "
           "schedule that fits (xafunc.plan shows the candidates and their estimated peaks).")


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` now (CUDA: ``mem_get_info``; CPU: available physical pages)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"  # pragma: no cover


def choose_chunk(name: str, *, result_bytes: float, per_direction_bytes: float,
                 directions: int, chunk_size: int | None, device: torch.device,
                 budget: float | None = None) -> int | None:
    """The number of directions to propagate at once, or a ``ValueError`` if nothing fits.

    ``chunk_size`` given by the user is honoured (and checked); otherwise all directions go at
    once when they fit, else the largest chunk that does.
    """
    if budget is None:
        budget = BUDGET_FRACTION * available_bytes(device)
    where = f"{device.type} memory"
    if result_bytes > budget:
        raise ValueError(
            f"{name}: the result alone needs {fmt_bytes(result_bytes)} but only "
            f"{fmt_bytes(budget)} of {where} is available. Reduce the order, differentiate "
            "fewer inputs (argnums), or ask for a contraction instead of the full tensor "
            "(xafunc.jet, xafunc.xlaplacian)."
        )
    room = budget - result_bytes
    if chunk_size is not None:
        need = min(chunk_size, directions) * per_direction_bytes
        if need > room:
            fit = int(room // per_direction_bytes)
            raise ValueError(
                f"{name}: chunk_size={chunk_size} needs about {fmt_bytes(need + result_bytes)} "
                f"(result {fmt_bytes(result_bytes)}) but only {fmt_bytes(budget)} of {where} "
                f"is available. Pass chunk_size={max(fit, 1)} or smaller."
                if fit >= 1 else
                f"{name}: even one direction at a time needs about "
                f"{fmt_bytes(per_direction_bytes + result_bytes)} but only {fmt_bytes(budget)} "
                f"of {where} is available. {_REMEDY}"
            )
        return chunk_size
    if directions * per_direction_bytes <= room:
        return None
    fit = int(room // per_direction_bytes)
    if fit < 1:
        raise ValueError(
            f"{name}: one direction at a time needs about "
            f"{fmt_bytes(per_direction_bytes + result_bytes)} but only {fmt_bytes(budget)} of "
            f"{where} is available. {_REMEDY}"
        )
    return fit


#: ``check_batch`` reads the device's free memory again only when a batch needs more than
#: this share of the last reading (a driver call per call costs microseconds on a CPU and more
#: on a GPU, where ``mem_get_info`` is an ioctl)
RECHECK_FRACTION = 0.25


def check_batch(name: str, per_sample_bytes: float, batch: int, device: torch.device,
                free: int | None = None) -> int:
    """Under ``vmap`` every sample's computation runs at once: refuse a batch whose estimated
    peak cannot fit, before allocating, naming the sizes and the remedy. ``free``: the free
    bytes read by an earlier check of the same computation, reused while the batch needs
    less than ``RECHECK_FRACTION`` of them; returns the reading used."""
    need = per_sample_bytes * batch
    if free is None or need > RECHECK_FRACTION * free:
        free = available_bytes(device)
    budget = BUDGET_FRACTION * free
    if need > budget:
        fit = max(int(budget // max(per_sample_bytes, 1.0)), 1)
        raise ValueError(
            f"{name}: under vmap, a batch of {batch} samples needs about {fmt_bytes(need)} "
            f"({fmt_bytes(per_sample_bytes)} per sample) but only {fmt_bytes(budget)} of "
            f"{device.type} memory is available. Pass a smaller batch, or chunk_size={fit} "
            "(or smaller) to torch.func.vmap, or spread the batch over more processes.")
    return free
