"""One context manager for the phase timings."""

from qig.pipeline.timing import Timer


def test_phases_accumulate_over_blocks_and_none_is_not_counted():
    timer = Timer()
    laps = []
    for phase in ("search", "propagate", "search", None):
        with timer(phase) as lap:
            pass
        laps.append(lap)
    assert list(timer.totals) == ["search", "propagate"]
    assert timer.totals["search"] == laps[0].seconds + laps[2].seconds
    assert timer.totals["propagate"] == laps[1].seconds


def test_a_phase_that_raises_is_still_counted():
    timer = Timer()
    try:
        with timer("gptq"):
            raise ValueError
    except ValueError:
        pass
    assert "gptq" in timer.totals
