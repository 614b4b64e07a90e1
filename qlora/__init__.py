"""qlora-bench's engine: what gets trained (Full FT, LoRA, QLoRA) on real libraries."""

import logging
import warnings

# bitsandbytes' CPU backend tries to fetch a kernel from the Hugging Face hub through the optional `kernels`
# package and logs a warning on every import when that package is absent. We never want a hub fetch at run time,
# and the fallback kernel is bitsandbytes' own, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still calls the pre-v5 name; harmless, and printed once per model build.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

from qlora.config import ConfigError, RunConfig  # noqa: E402

__all__ = ["ConfigError", "RunConfig"]
