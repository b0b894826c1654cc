"""Written by `minasgd assignment make`: run the tests against THIS tree's code.

`python -m pytest` puts this folder first on sys.path, so `import minasgd` finds ./minasgd. The
kernels live in ./kernels and are imported as `minasgd.kernels`; an editable install of another
copy would map that name to ITS kernels folder, so bind it to ./kernels here, before any test
imports it.
"""

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(_ROOT))
for _name in [n for n in sys.modules if n == "minasgd" or n.startswith("minasgd.")]:
    del sys.modules[_name]
import minasgd  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "minasgd.kernels", _ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(_ROOT / "kernels")])
_kernels = importlib.util.module_from_spec(_spec)
sys.modules["minasgd.kernels"] = _kernels
_spec.loader.exec_module(_kernels)
minasgd.kernels = _kernels
assert Path(minasgd.__file__).resolve().parent == _ROOT / "minasgd", minasgd.__file__
