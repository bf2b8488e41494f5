"""Make your own assistant: data, presets, training, merging, evaluation and chat (`python -m trainer`)."""
import logging

# bitsandbytes tries to fetch an optional CPU kernel from the Hub at import and warns when it can't;
# offline that is expected, and the built-in CPU path is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
