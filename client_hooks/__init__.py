"""tensortap client hooks: gated, sync-free telemetry from inside training.

`from client_hooks import Tap, TapCallback`. Importing this package imports neither torch
nor zmq; they load when a gated-on Tap first needs them.
"""
__all__ = ["Tap", "TapCallback"]


def __getattr__(name):  # lazy: keeps `import client_hooks` free of torch/lightning
    if name == "Tap":
        from client_hooks.tap import Tap
        return Tap
    if name == "TapCallback":
        from client_hooks.callback import TapCallback
        return TapCallback
    raise AttributeError(name)
