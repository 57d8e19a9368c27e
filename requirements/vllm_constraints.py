"""Print the lines of a lock (argv[1]) for packages this Python does not have yet: `make test-vllm` installs our
project into vLLM's venv with them as constraints, so what vLLM brought stays and the rest comes at our locked pins."""

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
for line in Path(sys.argv[1]).read_text().splitlines():
    if (m := re.match(r"^([A-Za-z0-9._-]+)==\S+", line)) and canonicalize_name(m[1]) not in installed:
        print(m[0])
