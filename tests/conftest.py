"""Suite-wide settings. Under CI (CI=true) hypothesis runs derandomized, so a submission's
result does not depend on the draw; development runs keep exploring new examples."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
