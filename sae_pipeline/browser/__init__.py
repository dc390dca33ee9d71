"""The feature browser: per-condition feature records (:mod:`.records`) and the static site (:mod:`.site`)."""

# Headless Chromium as the tests and the screenshot script start it on a machine without network: the
# background-networking flags stop its calls home, which a closed network refuses many at a time.
DEBIAN_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
