"""The rules: functions over a compiled policy (``Compiled``) and the facts of one
question. ``Engine.decide`` (engine/decide.py) calls them in order and applies the mode
(rules/mode.py) last; a table test may call one rule directly."""
