"""The printer owner's page in a real browser (Debian's headless Chromium)
against the real Moonraker + klippy stack: what it shows, that it follows
uploads and prints live, that it asks a login where Moonraker does, and that
it is usable by keyboard and at phone width."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from browser import Browser
from conftest import Keys
from gcodegen import new_canary, sample_gcode
from test_component import EncStack
from stack import ROOT, wait_for

PAGE = "/server/encrypted_print/page"
# Set ENCPRINT_DOCS_SCREENSHOTS=1 to refresh the pictures in docs/img/.
DOCS_IMG = ROOT / "docs" / "img"


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture
def enc_stack(request, binaries, tmp_path):
    stacks = []

    def make(keys: Keys, force_logins: bool = False) -> EncStack:
        st = EncStack(tmp_path / f"stack{len(stacks)}", keys)
        request.node._encprint_stack = st
        stacks.append(st)
        if force_logins:
            m = st.moonraker
            (m.data / "config").mkdir(parents=True, exist_ok=True)
            m.write_config()
            m.cfg.write_text(m.cfg.read_text().replace(
                "[authorization]\n", "[authorization]\nforce_logins: True\n"))
            m.keep_config = True
        return st.start()

    yield make
    for st in stacks:
        st.stop()


def cells(browser: Browser, table: str, filename: str) -> list:
    """The texts of the cells of the row for filename, or []."""
    return browser.js(
        f"Array.from(document.querySelectorAll('#{table} tbody tr'))"
        f".filter(r => r.dataset.filename === {json.dumps(filename)})"
        ".map(r => Array.from(r.cells).map(c => c.innerText))[0] || []")


def qr_text(browser: Browser, path: pathlib.Path) -> str:
    """What a phone's camera reads from the QR code on the screen. The page
    may still be moving (a live update landing); read until a code is seen."""
    def read() -> str:
        browser.screenshot(path, full_page=False, clip=browser.rect("#qr"))
        res = subprocess.run(["zbarimg", "--raw", "-q", str(path)], capture_output=True,
                             text=True)
        return res.stdout.strip() if res.returncode == 0 else ""
    return wait_for(read, 10, f"zbarimg to read a QR code in {path}", 0.3)


def keep_screenshot(browser: Browser, tmp_path: pathlib.Path, name: str) -> None:
    shot = browser.screenshot(tmp_path / name)
    if os.environ.get("ENCPRINT_DOCS_SCREENSHOTS"):
        DOCS_IMG.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_IMG / name)


def test_page_shows_the_printer_and_follows_uploads_and_prints_live(
        enc_stack, binaries, browser, tmp_path):
    keys = Keys(binaries, tmp_path / "keys")
    pub_key = tmp_path / "publisher.key"
    publisher = keys.encprint("sign-keygen", "-o", str(pub_key)).strip()
    st = enc_stack(keys)
    canary = new_canary()
    st.upload_encrypted("bracket.gcode", sample_gcode(layers=4, canary=canary),
                        "--max-prints", "1", "--sign", str(pub_key))
    st.upload_encrypted("old-offer.gcode", sample_gcode(layers=2),
                        "--not-after", "2020-01-01")

    browser.open(st.moonraker.url + PAGE)
    browser.wait_js("document.body.dataset.loaded", what="the page's first load")
    browser.wait_js("document.getElementById('live').textContent === 'Live'",
                    what="the websocket")
    browser.js("window.sameDocument = true")  # gone if the page reloads

    recipient = st.ui.get("/server/encrypted_print/recipient")["result"]["recipient"]
    assert browser.js("document.getElementById('recipient').textContent") == recipient
    browser.wait_js("(q => q.complete && !q.hidden)(document.getElementById('qr'))")
    assert qr_text(browser, tmp_path / "qr.png") == recipient

    row = cells(browser, "files", "bracket.gcode")
    assert row[1].startswith(publisher[:17]) and "signature valid" in row[1], row
    assert row[3].startswith("1 of 1") and "0 used" in row[3], row
    assert row[4] == "yes", row
    old = cells(browser, "files", "old-offer.gcode")
    assert old[4].startswith("no") and "old-offer.gcode expired on 2020-01-01" in old[4], old
    assert browser.js("document.getElementById('no-jobs').hidden") is False

    # A print: prints left drops and the decryption appears, without a reload.
    st.ui.start_print("bracket.gcode")
    st.wait_state("complete")
    wait_for(lambda: cells(browser, "files", "bracket.gcode")[3].startswith("0 of 1"), 20,
             "the page to show the print used")
    row = cells(browser, "files", "bracket.gcode")
    assert "may be printed only once, and it has been printed already" in row[4], row
    wait_for(lambda: cells(browser, "jobs", "bracket.gcode")[3:4] == ["complete"], 20,
             f"the page's record to show the print: {cells(browser, 'jobs', 'bracket.gcode')}")
    assert cells(browser, "jobs", "bracket.gcode")[2] == "#1"

    # An upload shows up, again without a reload.
    st.upload_encrypted("new-part.gcode", sample_gcode(layers=2))
    wait_for(lambda: cells(browser, "files", "new-part.gcode"), 20, "the new upload")
    assert cells(browser, "files", "new-part.gcode")[3].startswith("unlimited")
    assert browser.js("window.sameDocument") is True, "the page reloaded"

    # What the page shows is no more than the API gives: no cleartext, no
    # identity path, no key.
    html = browser.js("document.documentElement.outerHTML")
    assert canary not in html
    assert str(keys.identity) not in html and "AGE-SECRET-KEY" not in html
    assert browser.console_errors == []
    keep_screenshot(browser, tmp_path, "owner-page.png")


def test_keyboard_copies_the_recipient_and_phone_width_fits(enc_stack, binaries, browser,
                                                            tmp_path):
    keys = Keys(binaries, tmp_path / "keys")
    st = enc_stack(keys)
    st.upload_encrypted("a-rather-long-file-name-from-the-slicer_0.2mm_PLA_2h13m.gcode",
                        sample_gcode(layers=2), "--max-prints", "3")
    # A file name is someone else's text, never markup.
    trap = "<img src=x onerror=window.pwned=1>.gcode"
    st.upload_encrypted(trap, sample_gcode(layers=2))
    browser.viewport(390, 844, mobile=True)
    browser.open(st.moonraker.url + PAGE)
    browser.wait_js("document.body.dataset.loaded")
    assert cells(browser, "files", trap)[0] == trap
    assert browser.js("document.querySelectorAll('#files img').length") == 0
    assert browser.js("window.pwned") is None
    # Nothing is wider than the phone.
    assert browser.js("document.documentElement.scrollWidth") <= 390
    # Tab from the recipient reaches the Copy button; Enter copies.
    browser.js("document.getElementById('recipient').focus()")
    browser.press("Tab")
    assert browser.js("document.activeElement.id") == "copy"
    browser.press("Enter")
    browser.wait_js("document.getElementById('copied').textContent === 'Copied.'",
                    what="the copy confirmation")
    assert browser.console_errors == []
    keep_screenshot(browser, tmp_path, "owner-page-phone.png")


def post(url: str, payload: dict, token: str = "") -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"}
                                             if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_with_moonraker_logins_the_page_asks_for_a_user_and_shows_nothing_before(
        enc_stack, binaries, browser, tmp_path):
    keys = Keys(binaries, tmp_path / "keys")
    st = enc_stack(keys, force_logins=True)
    st.upload_encrypted("secret-project.gcode", sample_gcode(layers=2))
    base = st.moonraker.url
    # The first user ends trusted access (force_logins).
    post(base + "/access/user", {"username": "owner", "password": "correct horse"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(base + "/server/encrypted_print/files", timeout=10)
    assert ei.value.code == 401
    # The page itself is public and holds no data.
    with urllib.request.urlopen(base + PAGE, timeout=10) as r:
        shell = r.read().decode()
    assert "secret-project" not in shell and "age1" not in shell

    browser.open(base + PAGE)
    browser.wait_js("!document.getElementById('login').hidden", what="the login form")
    assert browser.js("document.getElementById('content').hidden") is True
    assert browser.js("document.activeElement.id") == "user"
    browser.js("document.getElementById('user').value = 'owner';"
               "document.getElementById('password').value = 'wrong';"
               "document.getElementById('login').requestSubmit()")
    browser.wait_js("document.getElementById('login-error').textContent",
                    what="the login error")
    assert "Login failed" in browser.js("document.getElementById('login-error').textContent")
    browser.js("document.getElementById('password').value = 'correct horse';"
               "document.getElementById('login').requestSubmit()")
    browser.wait_js("!document.getElementById('content').hidden", what="the page after login")
    assert cells(browser, "files", "secret-project.gcode")
    browser.wait_js("document.getElementById('live').textContent === 'Live'")

    # The websocket is authenticated too: a print shows up live.
    token = post(base + "/access/login", {"username": "owner",
                                          "password": "correct horse"})["result"]["token"]
    post(base + "/printer/print/start", {"filename": "secret-project.gcode"}, token)
    wait_for(lambda: cells(browser, "jobs", "secret-project.gcode")[3:4] == ["complete"], 30,
             "the logged-in page to show the print")
    assert cells(browser, "jobs", "secret-project.gcode")[4] == "owner"
    # An access token that no longer works (they last an hour) is renewed
    # with the refresh token, without asking the user again.
    browser.js("token = 'expired.or.garbled'; refresh()")
    browser.wait_js("token !== 'expired.or.garbled'", what="the renewed token")
    assert browser.js("document.getElementById('login').hidden") is True
    assert browser.js("document.getElementById('content').hidden") is False
    # The token lives in this tab only, never in the page's address.
    assert "token" not in browser.js("location.href")
    assert browser.js("localStorage.length") == 0
    # Chromium logs the 401 answers before the login and Moonraker's 400 to
    # the wrong password; nothing else may be in the console.
    expected = ("Failed to load resource: the server responded with a status of 401",
                "Failed to load resource: the server responded with a status of 400 "
                "(Invalid Password) (" + base + "/access/login)")
    errors = [e for e in browser.console_errors if not e.startswith(expected)]
    assert errors == [], browser.console_errors


def test_without_segno_the_page_shows_the_recipient_and_says_how_to_get_the_qr(
        request, binaries, browser, tmp_path):
    # Moonraker's virtualenv without segno, simulated: a module on
    # PYTHONPATH that fails to import, as a missing package does.
    shadow = tmp_path / "no-segno"
    shadow.mkdir()
    (shadow / "segno.py").write_text("raise ImportError('No module named segno')\n")
    keys = Keys(binaries, tmp_path / "keys")
    st = EncStack(tmp_path / "stack", keys)
    request.node._encprint_stack = st
    st.start(env={"PYTHONPATH": str(shadow)})
    try:
        browser.open(st.moonraker.url + PAGE)
        browser.wait_js("document.body.dataset.loaded")
        assert browser.js("document.getElementById('recipient').textContent") == keys.recipient
        assert browser.js("document.getElementById('qr').hidden") is True
        note = browser.js("document.getElementById('copied').textContent")
        assert "segno is missing in Moonraker's virtualenv" in note, note
        assert "pip install -r" in note
        # The only console entry is the QR request's 503.
        assert [e for e in browser.console_errors if "status of 503" not in e] == []
    finally:
        st.stop()


def test_a_component_without_its_page_folder_still_prints_and_says_so(
        request, binaries, tmp_path, monkeypatch):
    # encrypted_print.py copied alone into Moonraker (not linked from a
    # checkout): the page's files are not beside it.
    import stack as stack_module
    lone = tmp_path / "lone" / "encrypted_print.py"
    lone.parent.mkdir()
    shutil.copy(stack_module.COMPONENT_SRC, lone)
    link = stack_module.moonraker_components_dir() / "encrypted_print.py"
    install_linked = stack_module.install_plugins

    def install_lone() -> None:
        install_linked()
        link.unlink()
        link.symlink_to(lone)
    monkeypatch.setattr(stack_module, "install_plugins", install_lone)
    keys = Keys(binaries, tmp_path / "keys")
    st = EncStack(tmp_path / "stack", keys)
    request.node._encprint_stack = st
    try:
        st.start()
        warnings = st.ui.get("/server/info")["result"]["warnings"]
        assert any("the owner page is missing" in w and "install.sh" in w
                   and str(lone.parent / "page") in w for w in warnings), warnings
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(st.moonraker.url + PAGE, timeout=10)
        assert ei.value.code == 404
        # Everything else works: the API of the page, and printing.
        st.upload_encrypted("part.gcode", sample_gcode(layers=2), "--max-prints", "2")
        st.ui.start_print("part.gcode")
        st.wait_state("complete")
        files = wait_for(lambda: [f for f in st.ui.get("/server/encrypted_print/files")
                                  ["result"]["files"] if f["prints_used"] == 1], 10,
                         "the print to be counted")
        assert files[0]["prints_left"] == 1 and files[0]["printable"] is True
    finally:
        st.stop()
        monkeypatch.undo()
        install_linked()
    assert os.readlink(link) == str(stack_module.COMPONENT_SRC)
