"""Where decisions go: the events the proxy emits, the audit log, the metrics, and the
redaction rules both share. Sinks know the engine's Decision, never mitmproxy."""
