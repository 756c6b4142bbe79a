"""Patches to mitmproxy's own layers (bounds, back-pressure, early answers, the spliced
relay): each installs itself once and is tested on its own."""
