"""While an encrypted file is registered or prints, nothing reachable through
Moonraker's API (HTTP, websocket, the logs it serves) carries its commands or
its toolpath, macros cannot run code, and one decryption prints once; the
macros printer owners use keep working (docs/adr/009-lockdown.md).

Each attack goes through Moonraker's HTTP and websocket API only. Where the
attacker needs a printer.cfg change (anyone with the web UI can edit it and
restart Klipper), the stack starts with that printer.cfg."""
from __future__ import annotations

import json
import re
import time

import pytest
from conftest import Keys
from gcodegen import sample_gcode, toolpath_gcode
from stack import TOOLPATH_CANARIES, HTTPError, toolpath_hits, wait_for
from test_component import EncStack

BRIDGE = "[encrypted_file_bridge]\n"

# A printer owner's macros, in the style of the collections people use.
EVIL_BEFORE = """
[gcode_macro EVIL_BEFORE]
gcode:
  RESPOND MSG="pid {cycler.__init__.__globals__.os.getpid()}"
"""
OWNER_MACROS = """
[motion_report]

[sdcard_loop]

[gcode_macro EVIL_AFTER]
gcode:
  RESPOND MSG="{''.__class__.__mro__[1].__subclasses__()|length} classes"

[gcode_macro _CLIENT_VARIABLE]
variable_park_at_cancel: True
variable_custom_park_x: 10.0
variable_custom_park_y: 12.0
variable_park_dz: 5.0
gcode:

[gcode_macro PAUSE]
description: Pause the running print, park the head
rename_existing: PAUSE_BASE
gcode:
  {% set client = printer['gcode_macro _CLIENT_VARIABLE']|default({}) %}
  {% set x = params.X|default(client.custom_park_x)|float %}
  {% set y = params.Y|default(client.custom_park_y)|float %}
  {% set z = printer.toolhead.position.z %}
  PAUSE_BASE
  SAVE_GCODE_STATE NAME=PAUSE_state
  G91
  G1 Z{client.park_dz} F600
  G90
  G1 X{x} Y{y} F6000
  RESPOND MSG="parked above z={'%.1f' % z}"

[gcode_macro RESUME]
description: Resume the paused print
rename_existing: RESUME_BASE
gcode:
  {% set speed = params.VELOCITY|default(100)|int %}
  RESTORE_GCODE_STATE NAME=PAUSE_state MOVE=1 MOVE_SPEED={speed}
  RESUME_BASE {rawparams}

[gcode_macro CANCEL_PRINT]
description: Cancel the running print
rename_existing: CANCEL_PRINT_BASE
gcode:
  {% set client = printer['gcode_macro _CLIENT_VARIABLE']|default({}) %}
  {% if client.park_at_cancel and printer.pause_resume.is_paused %}
    RESPOND MSG="cancelled while paused"
  {% endif %}
  CANCEL_PRINT_BASE

[gcode_macro ADAPTIVE_MESH]
description: KAMP-style: mesh only the area the objects cover
gcode:
  {% set margin = params.MARGIN|default(5)|float %}
  {% set points = printer.exclude_object.objects | map(attribute='polygon') | sum(start=[]) %}
  {% set xs = points | map(attribute=0) | list %}
  {% set ys = points | map(attribute=1) | list %}
  {% if xs %}
    {% set lo = [(xs|min - margin)|round(1), (ys|min - margin)|round(1)] %}
    {% set hi = [(xs|max + margin)|round(1), (ys|max + margin)|round(1)] %}
    RESPOND MSG="mesh {lo|join(',')} {hi|join(',')}"
  {% else %}
    RESPOND MSG="mesh default"
  {% endif %}

[gcode_macro PRINT_START]
description: Klippain-style start with parameters
variable_state: 'idle'
gcode:
  {% set bed = params.BED_TEMP|default(60)|float %}
  {% set extruder = params.EXTRUDER_TEMP|default(200)|float %}
  {% set chamber = params.CHAMBER_TEMP|default(0)|int %}
  {% set material = params.MATERIAL|default("PLA")|string|upper %}
  {% set ns = namespace(steps=[]) %}
  {% for step in ["heat", "mesh", "purge"] %}
    {% set ns.steps = ns.steps + [step ~ "-" ~ loop.index] %}
  {% endfor %}
  SET_GCODE_VARIABLE MACRO=PRINT_START VARIABLE=state VALUE='"started"'
  {% set temps = "bed=%d extruder=%d chamber=%d" % (bed, extruder, chamber) %}
  RESPOND MSG="PRINT_START {material} {temps} steps={ns.steps|join(',')}"
  ADAPTIVE_MESH MARGIN=3

[gcode_macro M600]
description: Filament change
gcode:
  RESPOND MSG="filament change"
  PAUSE

[gcode_macro SET_PRINT_STATS_INFO]
description: Pause at a layer, as Mainsail and Fluidd set it
rename_existing: SET_PRINT_STATS_INFO_BASE
variable_pause_at: 0
gcode:
  {% if params.CURRENT_LAYER is defined and params.CURRENT_LAYER|int == pause_at %}
    SET_GCODE_VARIABLE MACRO=SET_PRINT_STATS_INFO VARIABLE=pause_at VALUE=0
    RESPOND MSG="pause at layer {pause_at}"
    PAUSE
  {% endif %}
  SET_PRINT_STATS_INFO_BASE {rawparams}

[gcode_macro SET_PAUSE_AT_LAYER]
gcode:
  SET_GCODE_VARIABLE MACRO=SET_PRINT_STATS_INFO VARIABLE=pause_at VALUE={params.LAYER|int}

[gcode_macro PASS]
variable_n: 0
gcode:
  SET_GCODE_VARIABLE MACRO=PASS VARIABLE=n VALUE={n + 1}

[gcode_macro SPY]
variable_runs: 0
variable_fresh: 0
variable_last: 0.0
gcode:
  {% set t = printer.toolhead.position.x %}
  SET_GCODE_VARIABLE MACRO=SPY VARIABLE=runs VALUE={runs + 1}
  G91
  G1 X0.01 F6000
  G90
  {% if t != last %}
    SET_GCODE_VARIABLE MACRO=SPY VARIABLE=fresh VALUE={fresh + 1}
    SET_GCODE_VARIABLE MACRO=SPY VARIABLE=last VALUE={t}
  {% endif %}

[delayed_gcode SPY_LOOP]
gcode:
  SPY
  UPDATE_DELAYED_GCODE ID=SPY_LOOP DURATION=0.01

[gcode_macro START_JOB]
description: A print-farm style start from a macro
gcode:
  SDCARD_PRINT_FILE FILENAME={params.F}
  RESPOND MSG="after-macro {params.F}"
"""


class LockStack(EncStack):
    def __init__(self, root, keys: Keys, printer_extra: str, before_bridge: str = "") -> None:
        super().__init__(root, keys)
        self.klippy.extra_config = before_bridge + BRIDGE + printer_extra

    def store(self) -> list:
        return self.ui.get("/server/gcode_store", count=1000)["result"]["gcode_store"]

    def responded(self, text: str) -> bool:
        """A console answer (gcode_store also holds the commands sent)."""
        return any(text in e["message"] for e in self.store() if e["type"] == "response")

    def ps(self) -> dict:
        return self.ui.query("print_stats")["print_stats"]

    def macro_var(self, macro: str, var: str):
        name = f"gcode_macro {macro}"
        return self.ui.query(name)[name][var]


def make(tmp_path_factory, binaries, name, printer_extra, before_bridge=""):
    keys = Keys(binaries, tmp_path_factory.mktemp(f"{name}-keys"))
    st = LockStack(tmp_path_factory.mktemp(name), keys, printer_extra, before_bridge)
    st.start()
    return st


@pytest.fixture(scope="module")
def owner(binaries, tmp_path_factory):
    st = make(tmp_path_factory, binaries, "owner", OWNER_MACROS, EVIL_BEFORE)
    yield st
    st.stop()


@pytest.fixture(autouse=True)
def _logs(request):
    for name in ("owner",):
        if name in request.fixturenames:
            request.node._encprint_stack = request.getfixturevalue(name)


def moonraker_and_klippy_logs(st: EncStack) -> str:
    return (st.moonraker.log.read_text(errors="replace")
            + st.klippy.log.read_text(errors="replace"))


# -- finding 2: the move stream (dump_trapq) -- first on this stack: it
# needs a stream opened before any encrypted print.

def test_no_move_stream_of_an_encrypted_print_reaches_moonraker_or_its_logs(owner):
    # A stream opened before the print: Moonraker logs what it receives.
    res = owner.ui.post("/printer/motion_report/dump_trapq", {"name": "toolhead"})
    assert "header" in json.dumps(res)
    canaries: set = set()
    plain = toolpath_gcode(60_000, canaries)
    TOOLPATH_CANARIES.update(canaries)
    owner.upload_encrypted("path.gcode", plain)
    owner.ui.start_print("path.gcode")
    owner.wait_state("printing", "complete")
    with pytest.raises(HTTPError) as ei:
        owner.ui.post("/printer/motion_report/dump_trapq", {"name": "toolhead"})
    assert "refused while an encrypted file prints" in ei.value.message
    owner.wait_state("complete")
    time.sleep(1.5)  # several batches of the stream opened before
    logs = moonraker_and_klippy_logs(owner)
    leaked = sorted(toolpath_hits(logs))
    assert not leaked, f"toolpath coordinates in moonraker.log/klippy.log: {leaked[:5]}"


def test_a_sampling_macro_sees_the_toolhead_no_faster_than_the_ui(owner):
    """A delayed_gcode loop reading printer.toolhead (and moving 0.01 mm, so
    that every fresh state differs) every 10 ms during an encrypted print's
    lockdown gets a fresh state at most 4 times a second,
    as the UI's subscription does (objects/query already answers at that
    cadence: Klipper serves queries from its 250 ms subscription timer)."""
    owner.upload_encrypted("spy.gcode", toolpath_gcode(3_000, set()))
    owner.ui.start_print("spy.gcode")
    owner.wait_state("complete")
    bridge = owner.ui.query("encrypted_file_bridge")["encrypted_file_bridge"]
    assert bridge.get("locked") is not False  # the move history holds the print
    runs0 = owner.macro_var("SPY", "runs")
    fresh0 = owner.macro_var("SPY", "fresh")
    owner.ui.gcode("UPDATE_DELAYED_GCODE ID=SPY_LOOP DURATION=0.01")
    t0 = time.monotonic()
    time.sleep(1.5)
    owner.ui.gcode("UPDATE_DELAYED_GCODE ID=SPY_LOOP DURATION=0")
    elapsed = time.monotonic() - t0
    runs = owner.macro_var("SPY", "runs") - runs0
    fresh = owner.macro_var("SPY", "fresh") - fresh0
    assert runs > 20, f"the loop ran {runs} times in {elapsed:.1f} s"
    assert fresh <= elapsed / 0.25 + 2, f"{fresh} fresh toolhead states in {runs} renders"


# -- finding 3: macro templates run code --

def test_macro_templates_cannot_reach_python(owner):
    for macro in ("EVIL_BEFORE", "EVIL_AFTER"):
        with pytest.raises(HTTPError) as ei:  # the websocket keeps the message
            owner.ui.rpc("printer.gcode.script", script=macro)
        assert macro in ei.value.message and "unsafe" in ei.value.message, ei.value.message
    assert owner.klippy.state() == "ready"


# -- ordinary macros in an encrypted print --

def owner_job() -> bytes:
    layer = []
    for n in range(1, 6):
        layer += [f"SET_PRINT_STATS_INFO CURRENT_LAYER={n}",
                  "EXCLUDE_OBJECT_START NAME=part_1", f"G1 X45 Y45 Z{n * 0.2:.1f} F3000",
                  "G1 X55 Y55", "EXCLUDE_OBJECT_END NAME=part_1",
                  "EXCLUDE_OBJECT_START NAME=part_2", "G1 X75 Y75", "G1 X85 Y85",
                  "EXCLUDE_OBJECT_END NAME=part_2"]
        if n == 2:
            layer.append("M600")
    return "\n".join([
        "EXCLUDE_OBJECT_DEFINE NAME=part_1 CENTER=50,50 POLYGON=[[40,40],[60,40],[60,60],[40,60]]",
        "EXCLUDE_OBJECT_DEFINE NAME=part_2 CENTER=80,80 POLYGON=[[70,70],[90,70],[90,90],[70,90]]",
        "PRINT_START EXTRUDER_TEMP=215 BED_TEMP=60 MATERIAL=petg",
        "SET_PRINT_STATS_INFO TOTAL_LAYER=5", "G90", *layer, "M400", ""]).encode()


def test_owner_macros_work_in_an_encrypted_print(owner):
    owner.ui.gcode("SET_PAUSE_AT_LAYER LAYER=4")
    owner.upload_encrypted("owner.gcode", owner_job())
    owner.ui.start_print("owner.gcode")
    owner.wait_state("paused")  # M600 at layer 2
    for text in ("PRINT_START PETG bed=60 extruder=215 chamber=0 steps=heat-1,mesh-2,purge-3",
                 "mesh 37.0,37.0 93.0,93.0", "filament change", "parked above z=0.4"):
        assert owner.responded(text), f"{text!r} not in the console"
    assert owner.macro_var("PRINT_START", "state") == "started"
    owner.ui.post("/printer/print/resume")
    wait_for(lambda: owner.responded("pause at layer 4"), 20, "the pause at layer 4")
    owner.wait_state("paused")
    owner.ui.gcode("EXCLUDE_OBJECT NAME=part_2")
    owner.ui.post("/printer/print/resume")
    owner.wait_state("complete")
    eo = owner.ui.query("exclude_object")["exclude_object"]
    assert eo["excluded_objects"] == ["PART_2"]
    assert owner.ps()["info"] == {"total_layer": 5, "current_layer": 5}
    owner.wait_released()


def test_cancel_from_pause_runs_the_owners_cancel_macro(owner):
    owner.upload_encrypted("cancel.gcode", owner_job())
    owner.ui.start_print("cancel.gcode")
    owner.wait_state("paused")
    owner.ui.post("/printer/print/cancel")
    owner.wait_state("cancelled")
    assert owner.responded("cancelled while paused")
    owner.wait_released()


# -- finding 6: one counted print runs the file once --

def test_seek_back_in_a_paused_encrypted_print_is_refused_and_resume_works(owner):
    n0 = owner.macro_var("PASS", "n")
    job = b"PASS\nG1 X1 Y1 F6000\nM600\nG1 X2 Y2\nM400\n"
    owner.upload_encrypted("seek.gcode", job)
    owner.ui.start_print("seek.gcode")
    owner.wait_state("paused")
    pos = owner.ui.query("virtual_sdcard")["virtual_sdcard"]["file_position"]
    with pytest.raises(HTTPError) as ei:
        owner.ui.gcode("M26 S0")
    assert "one decryption prints once" in ei.value.message and f"byte {pos}" in \
        ei.value.message, ei.value.message
    owner.ui.gcode(f"M26 S{pos}")  # where it paused: allowed
    owner.ui.post("/printer/print/resume")
    owner.wait_state("complete")
    assert owner.macro_var("PASS", "n") == n0 + 1, "the file ran more than once"
    owner.wait_released()


def test_a_loop_back_into_an_encrypted_file_is_refused(owner):
    n0 = owner.macro_var("PASS", "n")
    job = b"G90\nSDCARD_LOOP_BEGIN COUNT=3\nPASS\nG1 X1 Y1 F6000\nSDCARD_LOOP_END\nM400\n"
    owner.upload_encrypted("loop.gcode", job)
    owner.ui.start_print("loop.gcode")
    owner.wait_state("error", "complete")
    assert owner.macro_var("PASS", "n") == n0 + 1, "the loop replayed the file"
    assert owner.ps()["state"] == "error"
    assert "A loop back into the file refused" in owner.ps()["message"]
    owner.wait_released()


# -- finding 4: the registration cannot be seen, replayed or guessed --

def test_registration_leaves_no_trace_and_cannot_be_replayed(owner):
    owner.upload_encrypted("once.gcode", toolpath_gcode(300_000, set()), "--max-prints", "1")
    owner.ui.start_print("once.gcode")
    owner.wait_state("printing")
    store = json.dumps(owner.store())
    # What an attacker would try: every descriptor of Klipper's and
    # Moonraker's process, with any token the console or the logs show.
    kpid = owner.ui.get("/printer/info")["result"]["process_id"]
    tokens = set(re.findall(r"encprint-[0-9a-z]{1,32}", store + moonraker_and_klippy_logs(owner)))
    tokens.add("encprint-0")
    hits = []

    def attempt(pid: int, fd: int, token: str, size: int = 1) -> None:
        try:
            owner.ui.post("/printer/encrypted_file_bridge/register", {
                "filename": "once.gcode", "pid": pid, "fd": fd, "size": size, "token": token})
            hits.append((pid, fd, token, "endpoint"))
        except HTTPError as e:
            assert "/memfd:" not in e.message, f"a refusal describes fd {fd}: {e.message}"
        try:
            owner.ui.gcode(f"REGISTER_ENCRYPTED_FILE FILENAME=once.gcode PID={pid} "
                           f"FD={fd} SIZE={size} TOKEN={token}")
        except HTTPError as e:
            told = re.search(r"memfd has (\d+) bytes", e.message)
            if told and size == 1:  # the refusal told the size: try again
                attempt(pid, fd, token, int(told.group(1)))
            return
        if owner.ui.query("encrypted_file_bridge")["encrypted_file_bridge"]["registered"]:
            hits.append((pid, fd, token, "gcode"))
    for pid in (kpid, owner.moonraker.pid):
        for fd in range(0, 32):
            for token in tokens:
                attempt(pid, fd, token)
    assert not hits, f"registered by an attacker: {hits[:3]}"
    assert "REGISTER_ENCRYPTED_FILE" not in store and "encprint-" not in store, \
        "the registration is in the console history"
    if owner.ps()["state"] == "printing":
        owner.ui.post("/printer/print/cancel")
    owner.wait_state("cancelled", "complete")
    ended = owner.ps()["state"]
    owner.wait_released()
    with pytest.raises(HTTPError) as ei:
        owner.ui.start_print("once.gcode")
    assert "printed already" in ei.value.message, ei.value.message
    assert owner.ps()["state"] == ended, "it printed a second time"


# -- finding 7: bytes Klipper cannot read --

def test_invalid_utf8_is_refused_before_the_count_is_used(owner):
    plain = b"G90\nG1 X1 Y1 F6000\n; caf\xe9\nG1 X2 Y2\n"
    owner.upload_encrypted("latin1.gcode", plain, "--max-prints", "1")
    for _ in range(2):  # the count was not used by the first attempt
        with pytest.raises(HTTPError) as ei:
            owner.ui.start_print("latin1.gcode")
        want = f"not valid UTF-8 at byte {plain.index(bytes([0xe9]))}"
        assert want in ei.value.message, ei.value.message
    assert owner.klippy.state() == "ready"
    assert owner.ps()["state"] != "printing"
    owner.wait_released()


# -- issue 15 finding 3: console and macro starts behave as for a clear file --

def test_console_and_macro_starts_run_the_rest_of_the_script(owner):
    owner.upload_encrypted("console.gcode", sample_gcode(layers=3))
    owner.ui.gcode("RESPOND MSG=before-console\nSDCARD_PRINT_FILE FILENAME=console.gcode\n"
                   "RESPOND MSG=after-console")
    assert owner.responded("after-console")
    owner.wait_state("complete")
    assert owner.ps()["filename"] == "console.gcode"
    owner.wait_released()
    owner.upload_encrypted("macro.gcode", sample_gcode(layers=3))
    owner.ui.gcode("START_JOB F=macro.gcode")
    assert owner.responded("after-macro macro.gcode")
    wait_for(lambda: owner.ps()["filename"] == "macro.gcode" and owner.ps()["state"] == "complete",
             30, "the macro-started print to complete")
    owner.wait_released()
    owner.upload_encrypted("m23.gcode", sample_gcode(layers=2))
    owner.ui.gcode("M23 m23.gcode\nM24")
    wait_for(lambda: owner.ps()["filename"] == "m23.gcode" and owner.ps()["state"] == "complete",
             30, "the M23/M24 print to complete")
    results = [j["result"] for j in owner.jobs() if j["filename"] in
               ("console.gcode", "macro.gcode", "m23.gcode")]
    assert sorted(results) == ["complete"] * 3, results


def test_console_start_of_a_refused_file_fails_with_the_reason(owner):
    owner.ui.upload("theirs.gcode", owner.keys.other().encrypt(sample_gcode(layers=1)))
    with pytest.raises(HTTPError) as ei:
        owner.ui.gcode("SDCARD_PRINT_FILE FILENAME=theirs.gcode\nRESPOND MSG=not-reached")
    assert "encrypted for other printers" in ei.value.message
    assert not owner.responded("not-reached")
    assert owner.klippy.state() == "ready"
    owner.wait_released()


# -- finding 1: a macro in place of a geometry command --

G1_SPY = """
[gcode_macro G1]
rename_existing: G1.1
gcode:
  RESPOND MSG="move {rawparams}"
  G1.1 {rawparams}
"""


def test_a_macro_standing_in_for_g1_stops_encrypted_prints_only(binaries, tmp_path_factory,
                                                                request):
    st = make(tmp_path_factory, binaries, "g1spy", G1_SPY)
    request.node._encprint_stack = st
    try:
        canaries: set = set()
        plain = toolpath_gcode(2_000, canaries)
        TOOLPATH_CANARIES.update(canaries)
        st.upload_encrypted("spied.gcode", plain)
        for start in (lambda: st.ui.start_print("spied.gcode"),
                      lambda: st.ui.gcode("SDCARD_PRINT_FILE FILENAME=spied.gcode")):
            with pytest.raises(HTTPError) as ei:
                start()
            assert "[gcode_macro G1] stands in for G1" in ei.value.message, ei.value.message
        assert st.ui.query("print_stats")["print_stats"]["state"] == "standby"
        (st.gcodes / "clear.gcode").write_bytes(b"G90\nG1 X1 Y1 F6000\n")
        st.ui.start_print("clear.gcode")  # a clear file prints with the macro
        st.wait_state("complete")
        assert st.responded("move X1 Y1 F6000")
        st.wait_released()
    finally:
        st.stop()


# -- finding 5: a macro that starts the print and then fails --

START_WRAPPER = """
[gcode_macro SDCARD_PRINT_FILE]
rename_existing: SDCARD_PRINT_FILE_REAL
gcode:
  SDCARD_PRINT_FILE_REAL {rawparams}
  {action_raise_error("the wrapper fails after starting")}
"""


def test_a_wrapper_that_starts_and_fails_cannot_print_uncounted(binaries, tmp_path_factory,
                                                               request):
    st = make(tmp_path_factory, binaries, "wrapper", START_WRAPPER)
    request.node._encprint_stack = st
    try:
        st.upload_encrypted("once.gcode", sample_gcode(layers=3), "--max-prints", "1")
        with pytest.raises(HTTPError) as ei:
            st.ui.start_print("once.gcode")
        assert "[gcode_macro SDCARD_PRINT_FILE] stands in for SDCARD_PRINT_FILE" in \
            ei.value.message, ei.value.message
        time.sleep(1)
        ps = st.ui.query("print_stats")["print_stats"]
        assert ps["state"] == "standby" and ps["filename"] == "", f"it printed: {ps}"
        st.wait_released()
    finally:
        st.stop()


def test_a_refusal_raised_inside_a_macro_keeps_its_text_over_http(owner):
    name = "theirs<v2>零件.gcode"
    owner.ui.upload(name, owner.keys.other("stranger").encrypt(sample_gcode(layers=1)))
    with pytest.raises(HTTPError) as ei:
        owner.ui.gcode(f"START_JOB F={name}")
    assert "encrypted for other printers" in ei.value.message, ei.value.message
    assert "theirs\\x3cv2>\\u96f6\\u4ef6.gcode" in ei.value.message, ei.value.message
    assert owner.klippy.state() == "ready"
