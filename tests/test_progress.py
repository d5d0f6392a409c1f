"""Plain status lines (CI, logs): what they print."""
import io

from ernas.progress import StatusLines


def test_status_line_shows_fractional_progress_without_float_noise():
    """Profiling advances its bar in fractions of a key (1/2 to prepare, 1/20 per round); the
    line must read 1/2, not 0.9999999999999999/2. Fails if the count is printed raw."""
    out = io.StringIO()
    bar = StatusLines(total=2, desc="profiling", unit="key", file=out)
    bar.update(0.5)
    for _ in range(10):
        bar.update(0.05)
    bar.close()
    assert bar.n != 1  # the float sum itself is off by rounding
    assert out.getvalue().startswith("profiling: 1/2 key (")
