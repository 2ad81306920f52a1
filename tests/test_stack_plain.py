"""The baseline: a plain G-code file through the real stack, as a UI does it.
Every encrypted-print test is compared with this behaviour."""
from __future__ import annotations

from gcodegen import big_gcode, sample_gcode
from stack import wait_for


def test_plain_upload_prints_to_complete_and_lands_in_history(plain_stack):
    st = plain_stack
    data = sample_gcode(layers=10)
    res = st.ui.upload("part.gcode", data)
    assert res["item"]["path"] == "part.gcode"
    meta = st.ui.get("/server/files/metadata", filename="part.gcode")["result"]
    assert meta["slicer"] == "PrusaSlicer"
    assert meta["size"] == len(data)

    st.ui.start_print("part.gcode")
    st.wait_state("complete")
    ps = st.ui.query("print_stats")["print_stats"]
    assert ps["filename"] == "part.gcode"

    def history_done():
        jobs = st.ui.get("/server/history/list")["result"]["jobs"]
        return jobs and jobs[0]["status"] == "completed" and jobs[0]
    job = wait_for(history_done, 10, "a completed job in history")
    assert job["filename"] == "part.gcode"
    assert job["exists"] is True


def test_plain_pause_resume_and_cancel_of_a_long_file(plain_stack):
    st = plain_stack
    st.ui.upload("long.gcode", big_gcode(3_000_000))
    st.ui.start_print("long.gcode")
    st.wait_state("printing")
    st.pause_resume_cancel()
