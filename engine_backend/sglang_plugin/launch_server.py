"""`python -m engine_backend.sglang_plugin.launch_server <sglang args>`: SGLang's own
launcher, with the plugin registered first, so that `--attention-backend progserve_triton`
passes SGLang's command-line validation (which runs before SGLang loads plugins itself).
"""

from __future__ import annotations

import runpy

from engine_backend.sglang_plugin import register

if __name__ == "__main__":
    register()
    runpy.run_module("sglang.launch_server", run_name="__main__")
