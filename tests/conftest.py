"""Shared fixtures: the ``device`` parameter list, deterministic seeding, hypothesis profile."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

# The suite's tensors are tiny: intra-op threads buy nothing, and on a loaded 2-core CI runner
# OpenMP oversubscription makes nested-jacrev oracles 10-20x slower. One thread keeps the
# suite's runtime predictable.
torch.set_num_threads(1)

#: Every device a numeric test runs on: "cpu" always, "cuda" only where it is available
#: (elsewhere it shows up as a cleanly skipped parameter).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available")),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """The device a test's tensors live on."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so inputs (and failures) are reproducible."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _engine_must_run(request: pytest.FixtureRequest):
    """Every test runs under ``xafunc.strict()``: a request falling back to nested torch.func
    raises, so each numeric test proves the engine ran. Tests of requests meant to fall back
    are marked ``@pytest.mark.fallback`` and assert the plan's strategy and reason instead.
    Each test starts from an empty capture cache: tests that call one function with many
    configurations (parametrized, property-based) would otherwise add up to a capture storm
    across tests (NOTE [Capture storms]), and no test depends on another's captures."""
    import xafunc

    xafunc.clear_cache()
    with xafunc.strict(request.node.get_closest_marker("fallback") is None):
        yield


#: the plan label of each schedule :func:`only_schedule` can force
SCHEDULE_LABELS = {"taylor": "[fwd", "rev1": "[rev -> fwd", "rev2": "[rev -> rev -> fwd",
                   "adjoint": "[adjoint", "mixed": "mixed"}


@pytest.fixture
def only_schedule(monkeypatch: pytest.MonkeyPatch):
    """``only_schedule(kind)`` prices every candidate of mode ``"auto"`` out but those of one
    kind (:data:`SCHEDULE_LABELS`): Taylor levels only, one or two reverse levels under
    Taylor levels, the adjoint schedule, or a mixed cut. Where that kind does not apply, the
    plan takes another; a test checks the plan's label (``schedule_label``)."""
    import math

    import xafunc
    from xafunc._engine import program

    estimate, adjoint, mixed = (program.estimate, program.adjoint_candidate,
                                program.mixed_candidates)

    def use(kind: str) -> None:
        reverse = {"taylor": 0, "rev1": 1, "rev2": 2}.get(kind)

        def priced(order: int, r: int, *args, **kwargs):
            s = estimate(order, r, *args, **kwargs)
            if r != reverse:
                s.est_flops = math.inf
            return s

        monkeypatch.setattr(program, "estimate", priced)
        monkeypatch.setattr(program, "adjoint_candidate",
                            adjoint if kind == "adjoint" else lambda *a, **k: None)
        monkeypatch.setattr(program, "mixed_candidates",
                            mixed if kind == "mixed" else lambda *a, **k: [])
        monkeypatch.setattr(program, "_blocked_candidates", lambda *a, **k: [])
        xafunc.clear_cache()

    yield use
    xafunc.clear_cache()


def schedule_applies(kind: str, order: int) -> bool:
    """Whether ``only_schedule(kind)`` can give a schedule of that kind at ``order``: two
    reverse levels under a Taylor level need order 3, one needs order 2, the adjoint schedule
    is a candidate at orders 2 and 3."""
    low = {"taylor": 1, "rev1": 2, "rev2": 3, "adjoint": 2, "mixed": 1}[kind]
    return low <= order and not (kind == "adjoint" and order > 3)


def schedule_label(plan) -> str:
    """The schedule of an engine plan as its text shows it (``[rev -> fwd]``, ...)."""
    return str(plan).split("strategy: engine ", 1)[1].split("\n", 1)[0]


try:  # hypothesis is a test dependency, but keep collection working without it
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
