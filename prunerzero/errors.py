"""Exception types. A search catches `DegenerateMetricError`; users see the messages."""


class PrunerZeroError(Exception):
    """Base class of every error prunerzero raises on purpose."""


class MetricError(PrunerZeroError, ValueError):
    """A metric string or expression that cannot be used."""


class MetricSyntaxError(MetricError):
    """A metric string that does not parse; points at the offending column."""

    def __init__(self, message: str, text: str = "", col: int | None = None):
        self.message, self.text, self.col = message, text, col
        super().__init__(self._render())

    def _render(self) -> str:
        if self.col is None or not self.text:
            return self.message
        return f"{self.message}\n  {self.text}\n  {' ' * self.col}^"


class DegenerateMetricError(MetricError):
    """A metric that cannot rank weights: constant, independent of W, or constant within rows."""


class NonFiniteScoreError(DegenerateMetricError):
    """A metric whose scores contain NaN or infinity on some layer."""
