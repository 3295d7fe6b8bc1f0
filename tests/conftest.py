"""Suite-wide settings: property tests draw the same examples on every run (a fresh clone is green every time)."""

import os

from hypothesis import settings

# derandomize: examples come from a fixed seed, not from the clock or a local example database;
# DEFT_HYPOTHESIS_PROFILE=explore draws fresh random examples on every run (run it a few times when changing a method)
settings.register_profile("deft", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("DEFT_HYPOTHESIS_PROFILE", "deft"))
