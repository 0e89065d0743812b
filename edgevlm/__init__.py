"""edgevlm: trained 3D medical vision-language models, fast and offline on one workstation."""

import os

# Official onnxruntime builds (1.2x on) carry Microsoft's 1DS telemetry on Linux and macOS: `import
# onnxruntime` alone writes a persistent device id and queues a ProcessInfo event under
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime for upload, from native code no Python socket guard
# sees. edgevlm runs offline, in hospitals: the opt-out must be in the environment before onnxruntime
# initializes (it reads it once), so it is set here, on the first import of any edgevlm module, and is
# not left to the user. tests/test_offline_guard.py checks that nothing is written.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
