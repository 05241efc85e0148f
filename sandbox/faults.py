"""What the sandbox peers' fault settings share: faults armed for a number of requests."""

from __future__ import annotations


class CountedFaults:
    """Mixed into a faults dataclass whose counted fields are ints: -1 always, 0 off, n for the next n."""

    def take(self, count_name: str) -> bool:
        """Consume one firing of a counted fault; False when it is not armed."""
        remaining = getattr(self, count_name)
        if remaining == 0:
            return False
        if remaining > 0:
            setattr(self, count_name, remaining - 1)
        return True
