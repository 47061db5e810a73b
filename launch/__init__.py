"""What supervisor runs (worker, API server, web UI, controller) and what prepares it."""

import logging

# torchao (pulled in by Neural Compressor) tries to load its CUDA kernels at import and warns
# for each on a CPU-only torch; nothing here uses them.
logging.getLogger("torchao").setLevel(logging.ERROR)
# torchao registers enums with torch's pytree at import, which warns about a deprecation.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
