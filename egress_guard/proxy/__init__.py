"""The proxy layer: mitmproxy hook adapters that turn connections into engine questions
and enforce the answers, and the embedded mitmproxy master."""
