"""The dashboard beyond localhost in Debian's chromium: HTTPS with a certificate from the
federation CA, sign-in by the login form, and the token in no URL the browser ever asks for.

Chromium trusts exactly this server's key (``--ignore-certificate-errors-spki-list`` pins its
SPKI hash), not every certificate: the TLS verification against the CA itself is
``test_access.py::test_dashboard_over_tls_signs_in_by_post_and_never_takes_the_token_from_a_url``.
Skips where no chromium is installed (fails under CI=true, where .ci/run installs it).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from fedbus.dashboard.server import BackgroundServer, ServeOptions
from tests.dashboard.chromium import launch


def _spki_sha256(cert: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_sign_in_over_https_in_chromium(state, run_ids, tmp_path):
    from protocol.transport import certificates

    certificates.make_ca(tmp_path, federation="dash-browser")
    certificates.issue(tmp_path, "dashboard", server_names=["localhost"])
    token = "browser-t0ken-" + "y" * 24
    (tmp_path / "token").write_text(token + "\n")
    srv = BackgroundServer(ServeOptions(state=state, host="0.0.0.0", port=0, token_file=tmp_path / "token",
                                        tls_cert=tmp_path / "dashboard.pem", tls_key=tmp_path / "dashboard.key")).start()
    urls: list[str] = []
    try:
        with launch(f"--ignore-certificate-errors-spki-list={_spki_sha256(tmp_path / 'dashboard.pem')}") as browser:
            page = browser.new_page()
            page.on("request", lambda r: urls.append(r.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"https://localhost:{srv.port}/runs")
            assert page.url.endswith("/login")  # signed out: the form, not the runs
            page.fill("#token", token + "z")
            page.click("#sign-in")
            assert page.locator("#login-problem").inner_text() == "wrong token"
            page.fill("#token", token)
            page.click("#sign-in")
            page.wait_for_url("**/runs")
            page.locator(f'text="{run_ids[0]}"').first.wait_for(timeout=30_000)  # filled from /api/runs
            cookie = {c["name"]: c for c in page.context.cookies()}["fedbus_token"]
            assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert page.evaluate("document.cookie") == ""  # no script can read it
            # Signed out again (cookie gone): the next API call sends the page to the form.
            page.context.clear_cookies()
            page.goto(f"https://localhost:{srv.port}/sites")
            page.wait_for_url("**/login")
            assert not errors, errors
    finally:
        srv.stop()
    assert urls and all(u.startswith("https://") for u in urls), urls
    assert not [u for u in urls if token in u or "token=" in u], urls
