"""Model profiles: declarative files that say how genimg drives a served Triton pipeline.

- :mod:`genimg.profiles.schema`: the profile (pydantic), its input and output bindings;
- :mod:`genimg.profiles.registry`: the profiles directory (``GENIMG_PROFILES_DIR``, default the bundled ones);
- :mod:`genimg.profiles.params`: a job's generation parameters, validated and resolved per item;
- :mod:`genimg.profiles.tensors`: request inputs from items, images and metadata from outputs.
"""

from genimg.profiles.registry import Profiles, load_profiles, profiles_dir, read_profile
from genimg.profiles.schema import ModelProfile

__all__ = ["ModelProfile", "Profiles", "load_profiles", "profiles_dir", "read_profile"]
