"""What Mainsail and Fluidd show for an encrypted file equals what they show
for the same G-code uploaded in clear: Moonraker's metadata, compared as
whole dictionaries, thumbnails included, for each slicer's output; and the
progress figure during the print, which comes from those byte offsets."""
from __future__ import annotations

import pytest
from conftest import Keys
from gcodegen import sample_gcode
from slicer_samples import SAMPLES
from stack import wait_for
from test_component import EncStack

# The only keys that must differ between the two uploads: the files' own
# size and modification time and Moonraker's random uuid (the ciphertext is
# another file, uploaded at another moment), the path that was asked for
# (clear/x.gcode, enc/x.gcode), and the component's own record.
DIFFERENT = {"size", "modified", "uuid", "filename", "encrypted_print"}


@pytest.fixture
def stack(request, binaries, tmp_path):
    st = EncStack(tmp_path / "stack", Keys(binaries, tmp_path / "keys"))
    request.node._encprint_stack = st
    st.start()
    yield st
    st.stop()


def metadata(stack, path: str, encrypted: bool) -> dict:
    def ready():
        md = stack.ui.get("/server/files/metadata", filename=path)["result"]
        return md if ("encrypted_print" in md) == encrypted else None
    return wait_for(ready, 20, f"the metadata of {path}")


def upload_pair(stack, name: str, plain: bytes) -> tuple:
    stack.ui.upload(name, plain, path="clear")
    stack.ui.upload(name, stack.keys.encrypt(plain), path="enc")
    return (metadata(stack, f"clear/{name}", False), metadata(stack, f"enc/{name}", True))


def test_encrypted_metadata_equals_clear_for_every_slicer(stack):
    problems = []
    for sample, make in SAMPLES.items():
        plain = make().encode()
        clear, enc = upload_pair(stack, f"{sample}.gcode", plain)
        assert enc["encrypted_print"]["authenticated"] is True
        want = {k: v for k, v in clear.items() if k not in DIFFERENT}
        got = {k: v for k, v in enc.items() if k not in DIFFERENT}
        if got != want:
            keys = sorted(set(got) | set(want))
            problems.append(f"{sample}: " + "; ".join(
                f"{k}: {got.get(k, '<absent>')!r} != clear {want.get(k, '<absent>')!r}"
                for k in keys if got.get(k) != want.get(k)))
        for t in clear.get("thumbnails", []):
            a = stack.gcodes / "clear" / t["relative_path"]
            b = stack.gcodes / "enc" / t["relative_path"]
            if not b.exists() or a.read_bytes() != b.read_bytes():
                problems.append(f"{sample}: thumbnail {t['relative_path']} differs")
    assert not problems, "\n".join(problems)


def test_a_thumbnail_without_a_32x32_gets_the_miniature_moonraker_makes(stack):
    clear, enc = upload_pair(stack, "cube.gcode", SAMPLES["prusaslicer"]().encode())
    sizes = [(t["width"], t["height"]) for t in enc["thumbnails"]]
    assert sizes == [(32, 18), (16, 16), (220, 124)]  # 220x124 scaled to fit 32x32
    assert enc["first_layer_bed_temp"] == 0.0 and enc["first_layer_extr_temp"] == 200.0


def mainsail_progress(md: dict, vsd: dict) -> float:
    """Mainsail's getPrintPercentByFilepositionRelative (its default)."""
    start, end, pos = md.get("gcode_start_byte"), md.get("gcode_end_byte"), vsd["file_position"]
    if start and end:
        if pos <= start:
            return 0
        if pos >= end:
            return 1
        if pos - start > 0 and end - start > 0:
            return (pos - start) / (end - start)
    return vsd["progress"]


def test_progress_during_an_encrypted_print_equals_the_clear_files(stack):
    plain = sample_gcode(layers=60, moves_per_layer=2000)
    clear, enc = upload_pair(stack, "long.gcode", plain)
    (stack.gcodes / "clear" / "long.gcode").unlink()  # its canary must not stay on disk
    stack.ui.start_print("enc/long.gcode")
    stack.wait_state("printing")
    seen = []
    while True:
        st = stack.ui.query("virtual_sdcard", "print_stats")
        vsd, state = st["virtual_sdcard"], st["print_stats"]["state"]
        assert vsd["file_size"] == len(plain)  # the cleartext's size
        seen.append((mainsail_progress(enc, vsd), mainsail_progress(clear, vsd)))
        if state != "printing":
            break
    assert state == "complete"
    assert all(e == c for e, c in seen), seen
    assert [e for e, _ in seen] == sorted(e for e, _ in seen)
    assert seen[-1][0] == 1
    assert len(seen) > 2 and 0 < seen[1][0] < 1, seen
    stack.wait_released()
