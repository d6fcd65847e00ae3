"""Load a page in Debian's headless chromium with every network path closed, and report what it did.

Used by ``test_report_browser.py``. Chromium runs with background networking off, a proxy that is a
local recorder (every HTTP(S) request or CONNECT it sees is a request that tried to leave the
machine) and a host resolver that resolves nothing. The page is first loaded as a copy with a
probe script appended: on ``load`` it measures every ``<img>`` and ``<svg>`` and lists the resources
the page fetched, and writes that as JSON into the DOM, which ``--dump-dom`` hands back.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
      w: i.naturalWidth, h: i.naturalHeight, shown_w: i.getBoundingClientRect().width}));
  const svgs = [...document.querySelectorAll('svg')].map(s => {
      const r = s.getBoundingClientRect(); return {w: r.width, h: r.height}; });
  const resources = performance.getEntriesByType('resource').map(e => e.name);
  const out = document.createElement('pre');
  out.id = 'moeprof-probe';
  out.textContent = JSON.stringify({imgs, svgs, resources,
      sections: [...document.querySelectorAll('section')].map(s => s.id),
      scroll_w: document.documentElement.scrollWidth, title: document.title});
  document.body.appendChild(out);
});
</script>
"""


# Chromium's own housekeeping (component updater, account check), whatever the flags: the recorder
# traps these too, so they never reach the network, and they are not the page's.
BROWSER_HOUSEKEEPING = ("update.googleapis.com", "accounts.google.com", "clients2.google.com",
                        "clientservices.googleapis.com", "optimizationguide-pa.googleapis.com")


# A connection to the proxy closed before it sent a byte: chromium opens sockets to its proxy ahead of
# need (preconnect) and closes unused ones when it exits. It names no destination, so it is nobody's
# request. Seen once in this project's runs, at load on two cores: the test failed with the page's requests [''].
UNUSED = "<connection closed unused>"


def page_requests(requests: list[str]) -> list[str]:
    """The recorded requests that are not chromium's own housekeeping nor its unused preconnections."""
    out = []
    for line in requests:
        if line == UNUSED:
            continue
        parts = line.split()
        target = parts[1] if len(parts) > 1 else line
        host = re.sub(r"^[a-z]+://", "", target).split("/", 1)[0].split(":", 1)[0]
        if host not in BROWSER_HOUSEKEEPING:
            out.append(line)
    return out


class Recorder:
    """A TCP listener standing in for the proxy: records the first line of every connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    data = conn.recv(4096)
                    first = data.split(b"\r\n", 1)[0].decode("latin-1") if data else UNUSED
                except OSError:
                    first = "<connection without a request line>"
                self.requests.append(first)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _flags(profile: Path, proxy_port: int) -> list[str]:
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
        "--disable-client-side-phishing-detection", "--disable-domain-reliability", "--no-pings",
        "--disable-breakpad", "--metrics-recording-only", "--safebrowsing-disable-auto-update",
        "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
        "AutofillServerCommunication,CertificateTransparencyComponentUpdater,DialMediaRouteProvider",
        "--hide-scrollbars", "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ]


def probe(page: Path, workdir: Path, *, screenshot: Path | None = None, width: int = 1280,
          height: int = 2400) -> dict:
    """Load ``page`` (a file) in chromium; return the probe's JSON plus ``requests`` seen by the recorder."""
    page = Path(page).resolve()
    html = page.read_text(encoding="utf-8")
    # The probe copy: drop the page's Content-Security-Policy (it would also block any stray fetch,
    # and we want to *see* stray fetches, not have them silently blocked), append the probe script.
    probed = re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "", html)
    probed = probed.replace("</body>", PROBE + "</body>")
    copy = page.with_name("_probe_" + page.name)
    copy.write_text(probed, encoding="utf-8")
    rec = Recorder()
    try:
        cmd = _flags(workdir / "profile", rec.port) + [
            f"--window-size={width},{height}", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        match = re.search(r'<pre id="moeprof-probe">(.*?)</pre>', run.stdout, re.S)
        if not match:
            raise AssertionError(f"probe did not run; chromium exit {run.returncode}: {run.stderr[-2000:]}")
        result = json.loads(_unescape(match.group(1)))
        if screenshot is not None:
            # The screenshot is of the page exactly as shipped (its CSP included).
            cmd = _flags(workdir / "profile2", rec.port) + [
                f"--window-size={width},{height}", f"--screenshot={screenshot}", page.as_uri()
            ]
            shot = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if not screenshot.exists():
                raise AssertionError(f"no screenshot; chromium exit {shot.returncode}: {shot.stderr[-2000:]}")
    finally:
        rec.close()
        copy.unlink(missing_ok=True)
    result["requests"] = list(rec.requests)
    result["page_requests"] = page_requests(rec.requests)
    return result


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
