"""draftcache: cache a frozen target's supervision once, train speculative-decoding drafts many times."""

__version__ = "0.1.0"
