"""The shared inference core: device choice, loading (+adapter, +4/8-bit), streaming chat.

    from inference import load
    engine = load("merged/").engine()
    for partial in engine.stream_chat([{"role": "user", "content": "你是谁"}]):
        print(partial)
"""
from inference.device import Placement, pick
from inference.engine import ChatEngine
from inference.loader import Loaded, load

__all__ = ["ChatEngine", "Loaded", "Placement", "load", "pick"]
