# Print encrypted G-code from a sealed memfd
#
# Moonraker's encrypted_print component decrypts a file into a sealed memfd and
# registers it here through the encrypted_file_bridge/register API endpoint;
# virtual_sdcard then streams it like any other file. An encrypted file that
# was not registered is never streamed as G-code. While an encrypted file is
# registered or prints, the lockdown below keeps its commands and toolpath
# inside Klipper's executor. See docs/adr/009-lockdown.md of klipper-encprint.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import array, fcntl, importlib, io, itertools, logging, os, re, socket
import stat, struct, threading, zlib

MAGIC = b"age-encryption.org/v1\n"
ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
ALL_SEALS = 0x1 | 0x2 | 0x4 | 0x8    # F_SEAL_SEAL|SHRINK|GROW|WRITE
F_GET_SEALS = 1034
VALID_EXTS = ('.gcode', '.g', '.gco')
TOKEN_RE = re.compile(r'^encprint-[0-9a-z]{1,32}$')
REMOTE_METHOD = "encrypted_print_prepare"
REGISTER_ENDPOINT = "encrypted_file_bridge/register"
REGISTER_PARAMS = ("filename", "pid", "fd", "size", "token")
REFUSE_ENDPOINT = "encrypted_file_bridge/refuse"
REFUSE_PARAMS = ("filename", "message")
# Commands whose parameters carry the part's geometry or its process, and the
# commands that start a counted print: while an encrypted file is registered
# or prints, no [gcode_macro] may stand in for them.
GUARDED_COMMANDS = (
    'G0', 'G1', 'G2', 'G3', 'G10', 'G11', 'G92', 'G90', 'G91', 'M82', 'M83',
    'M204', 'M220', 'M221', 'SET_VELOCITY_LIMIT', 'SET_PRESSURE_ADVANCE',
    'SET_RETRACTION', 'SDCARD_PRINT_FILE', 'M23')
# Status objects that carry the toolhead position, and the rate at which the
# UI's subscription shows them: API queries get them no faster.
STATUS_INTERVAL = .250
STATUS_OBJECTS = ('toolhead', 'gcode_move', 'motion_report')
# The trapq and step history Klipper keeps (MOVE_HISTORY_EXPIRE is 30 s):
# motion dumps stay silent that long after an encrypted print ended.
LOCKDOWN_GRACE = 35.
# Every memfd registered in this klippy process, RESTART included: one
# decryption is registered once.
_REGISTERED = set()


# A decrypted payload that is a seekable gzip (docs/format.md of
# klipper-encprint): block members, index members, a footer member.
_GZ_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
SEEKGZ_MAGIC = _GZ_HEAD + b"\x08\x00Eb\x04\x00"
SEEKGZ_FOOTER_HEAD = _GZ_HEAD + b"\x24\x00Ef\x20\x00"
SEEKGZ_EMPTY_TAIL = b"\x03\x00" + b"\x00" * 8
SEEKGZ_FOOTER_SIZE = len(SEEKGZ_FOOTER_HEAD) + 32 + len(SEEKGZ_EMPTY_TAIL)
SEEKGZ_INDEX_MAX = (65535 - 4) // 4
SEEKGZ_MIN_BLOCK, SEEKGZ_MAX_BLOCK = 4 << 10, 1 << 20
SEEKGZ_MIN_MEMBER = len(SEEKGZ_MAGIC) + 4 + 2 + 8


class ShutdownRead(IOError):
    pass


class SeekgzError(IOError):
    pass


class _MemfdRaw(io.FileIO):
    # Refuses reads once Klipper is shut down: virtual_sdcard logs the text
    # around the print position on shutdown, which must not be cleartext.
    def __init__(self, fd, path, printer):
        io.FileIO.__init__(self, fd, 'rb', closefd=True)
        self.name = path    # what virtual_sdcard reports as file_path
        self._printer = printer
    def readinto(self, b):
        if self._printer.is_shutdown():
            raise ShutdownRead("read refused after shutdown (encrypted file)")
        return io.FileIO.readinto(self, b)


class _GuardedBuffer(io.BufferedReader):
    # The same guard above the buffer, so buffered bytes are refused too.
    def _check(self):
        if self.raw._printer.is_shutdown():
            raise ShutdownRead("read refused after shutdown (encrypted file)")
    def read(self, *args):
        self._check()
        return io.BufferedReader.read(self, *args)
    def read1(self, *args):
        self._check()
        return io.BufferedReader.read1(self, *args)
    def peek(self, *args):
        self._check()
        return io.BufferedReader.peek(self, *args)
    def readinto(self, b):
        self._check()
        return io.BufferedReader.readinto(self, b)
    def readinto1(self, b):
        self._check()
        return io.BufferedReader.readinto1(self, b)


def _pread(fd, n, off):
    data = os.pread(fd, n, off)
    if len(data) != n:
        raise SeekgzError("short read at byte %d of the memfd" % (off,))
    return data


def _member_bound(bs):
    # Above any deflate of bs bytes with its gzip framing (incompressible
    # data: bs plus a few hundred bytes), so that a lying index cannot make
    # a read of one block pull in much more than a block
    return bs + bs // 8 + 1024


class SeekgzIndex:
    # The footer and index of a seekable gzip memfd, checked to add up. The
    # helper inflated every block before the memfd left it; this refuses
    # what does not add up, so no size is trusted blindly.
    def __init__(self, fd, size):
        if size < SEEKGZ_FOOTER_SIZE:
            raise SeekgzError("too short for a seekable gzip footer")
        foot = _pread(fd, SEEKGZ_FOOTER_SIZE, size - SEEKGZ_FOOTER_SIZE)
        if (not foot.startswith(SEEKGZ_FOOTER_HEAD)
                or not foot.endswith(SEEKGZ_EMPTY_TAIL)):
            raise SeekgzError("no seekable gzip footer at its end")
        version, bs, clear, ioff, nblocks, ilen = struct.unpack_from(
            "<IIQQII", foot, len(SEEKGZ_FOOTER_HEAD))
        if version != 1:
            raise SeekgzError("seekable gzip version %d is not supported"
                              % (version,))
        if not SEEKGZ_MIN_BLOCK <= bs <= SEEKGZ_MAX_BLOCK:
            raise SeekgzError("footer block size %d is out of range" % (bs,))
        if (nblocks != (clear + bs - 1) // bs
                or nblocks > size // SEEKGZ_MIN_MEMBER):
            raise SeekgzError("footer block count %d does not match its"
                              " G-code size %d" % (nblocks, clear))
        if ioff + ilen + SEEKGZ_FOOTER_SIZE != size:
            raise SeekgzError("index does not end at the footer")
        raw = _pread(fd, ilen, ioff)
        sizes = []
        pos, left = 0, nblocks
        while left:
            k = min(left, SEEKGZ_INDEX_MAX)
            head = _GZ_HEAD + struct.pack("<H2sH", 4 + 4 * k, b"Ei", 4 * k)
            end = pos + len(head) + 4 * k
            if (raw[pos:pos + len(head)] != head
                    or raw[end:end + 10] != SEEKGZ_EMPTY_TAIL):
                raise SeekgzError("malformed index member at byte %d"
                                  % (ioff + pos,))
            sizes.append(array.array('I', raw[pos + len(head):end]))
            pos, left = end + 10, left - k
        if pos != ilen:
            raise SeekgzError("index length does not match its entries")
        sizes = array.array('I', itertools.chain(*sizes))
        if sizes and (min(sizes) < SEEKGZ_MIN_MEMBER
                      or max(sizes) > _member_bound(bs)):
            raise SeekgzError("index lists a block member of an impossible"
                              " size for %d-byte blocks" % (bs,))
        self.offsets = array.array('Q', [0])
        self.offsets.extend(itertools.accumulate(sizes))
        if self.offsets[-1] != ioff:
            raise SeekgzError("blocks do not end where the index starts")
        self.block_size = bs
        self.clear_size = clear
    def blocks(self):
        return len(self.offsets) - 1


class SeekgzRaw(io.RawIOBase):
    # The G-code inside a seekable gzip memfd, at the G-code's byte offsets:
    # each read inflates at most one block (bounded, CRC-checked) and keeps
    # it. Reads with pread, never maps the memfd. Reads are refused once
    # Klipper is shut down, as _MemfdRaw's. With an executor (Klipper
    # master's virtual_sdcard I/O thread) a read that inflates a block runs
    # on that thread, as master reads its own files, while the reactor goes
    # on (a read inside the kept block is a copy, done in place); the lock
    # orders it with seek, tell and close, which run where they are called.
    # A close while a read is queued or running closes the memfd when that
    # read is done, so the read never meets a closed (or reused) fd.
    def __init__(self, fd, path, label, printer, index, executor=None):
        io.RawIOBase.__init__(self)
        self.name = path    # what virtual_sdcard reports as file_path
        self._fd = fd
        self._label = label
        self._printer = printer
        self._index = index
        self._executor = executor
        self._lock = threading.Lock()
        self._reads = 0
        self._close_after_read = False
        self._pos = 0
        self._block = -1
        self._data = b""
    def readable(self):
        return True
    def seekable(self):
        return True
    def seek(self, offset, whence=io.SEEK_SET):
        with self._lock:
            self._checkClosed()
            if whence == io.SEEK_CUR:
                offset += self._pos
            elif whence == io.SEEK_END:
                offset += self._index.clear_size
            elif whence != io.SEEK_SET:
                raise ValueError("invalid whence %r" % (whence,))
            if offset < 0:
                raise ValueError("negative seek position %d" % (offset,))
            self._pos = offset
            return offset
    def tell(self):
        with self._lock:
            self._checkClosed()
            return self._pos
    def readinto(self, b):
        if self._printer.is_shutdown():
            raise ShutdownRead("read refused after shutdown (encrypted file)")
        with self._lock:
            self._checkClosed()
            ix = self._index
            if (self._executor is None or self._pos >= ix.clear_size
                    or self._pos // ix.block_size == self._block):
                return self._copy(b)    # no block to inflate
            self._reads += 1
        return self._executor.submit(self._read, b)
    def _read(self, b):
        with self._lock:
            try:
                return self._copy(b)
            finally:
                self._reads -= 1
                if self._close_after_read and not self._reads:
                    self._close()
    def _copy(self, b):
        ix = self._index
        if self._pos >= ix.clear_size:
            return 0
        i = self._pos // ix.block_size
        if i != self._block:
            self._load(i)
        start = self._pos - i * ix.block_size
        n = min(len(b), len(self._data) - start)
        b[:n] = self._data[start:start + n]
        self._pos += n
        return n
    def _load(self, i):
        ix = self._index
        want = min(ix.block_size, ix.clear_size - i * ix.block_size)
        self._block, self._data = -1, b""
        try:
            member = _pread(self._fd, ix.offsets[i + 1] - ix.offsets[i],
                            ix.offsets[i])
        except (OSError, IOError) as e:
            raise self._error(i, "cannot be read (%s)" % (e,))
        if not member.startswith(SEEKGZ_MAGIC):
            raise self._error(i, "is not where the index says")
        d = zlib.decompressobj(31)
        try:
            data = d.decompress(member, want + 1)
        except zlib.error as e:
            raise self._error(i, "does not inflate (%s)" % (e,))
        if len(data) != want or not d.eof or d.unused_data:
            raise self._error(i, "inflates to %d bytes, not %d"
                              % (len(data), want))
        self._block, self._data = i, data
    def _error(self, i, what):
        return SeekgzError(
            "block %d (G-code bytes %d-%d) of encrypted file %s %s: its"
            " decrypted copy is damaged; start the print again from"
            " Moonraker" % (i, i * self._index.block_size,
                            (i + 1) * self._index.block_size - 1,
                            self._label, what))
    def close(self):
        with self._lock:
            if self._reads:
                self._close_after_read = True
            else:
                self._close()
    def _close(self):
        if self.closed:
            return
        self._data = b""
        try:
            os.close(self._fd)
        finally:
            io.RawIOBase.close(self)


class _Text(io.TextIOWrapper):
    # Remembers a read that failed, so the print ends as an error (not as a
    # "paused" print stuck at that byte). After a shutdown it reads as
    # empty: the only reader then is virtual_sdcard's dump of the text
    # around the position (its print loop has stopped reading), which so
    # logs nothing, and no traceback, even once the file is closed.
    read_error = None
    printer = None
    def read(self, *args):
        if self.printer.is_shutdown():
            return ""
        try:
            return io.TextIOWrapper.read(self, *args)
        except UnicodeDecodeError as e:
            self.read_error = ("(%s at byte %d of a read): it is not UTF-8"
                               " G-code" % (e.reason, e.start))
            raise
        except SeekgzError as e:
            self.read_error = "(%s)" % (e,)
            raise
    def seek(self, *args):
        if self.printer.is_shutdown():
            return 0
        return io.TextIOWrapper.seek(self, *args)


class _Registration:
    # index: a SeekgzIndex for a seekable gzip memfd, else None. executor:
    # virtual_sdcard's I/O thread (Klipper master), which then inflates and
    # reads, as master reads its own files; None: the reactor reads.
    def __init__(self, name, path, fd, size, printer, expires, index=None,
                 executor=None):
        self.name = name
        self.size = size
        self.expires = expires
        if index is None:
            self.raw = _MemfdRaw(fd, path, printer)
        else:
            self.raw = SeekgzRaw(fd, path, name, printer, index, executor)
        self.file = _Text(_GuardedBuffer(self.raw), encoding='utf-8',
                          newline='')
        self.file.printer = printer
    def close(self):
        # The raw first: with a read in flight on virtual_sdcard's thread the
        # buffer above it is busy (closing it would be a reentrant call);
        # the raw then closes the memfd when that read is done.
        self.raw.close()
        if not self.raw.closed:
            return
        try:
            self.file.close()
        except Exception:
            logging.exception("encrypted_file_bridge close")


class _RedactingGCode:
    # Stands in for virtual_sdcard's reference to the G-code dispatcher: a
    # G-code error raised by a line of an encrypted file is re-raised without
    # the line, so print_stats.message does not carry cleartext.
    def __init__(self, gcode, bridge):
        self._gcode = gcode
        self._bridge = bridge
        self.error = gcode.error
    def __getattr__(self, name):
        return getattr(self._gcode, name)
    def run_script(self, script):
        self._bridge.note_line()
        try:
            self._gcode.run_script(script)
        except self._gcode.error as e:
            if self._bridge.streaming() and not self._bridge.is_own(e):
                raise self._gcode.error(self._bridge.redacted_error())
            raise


def _owner(func, depth=0):
    # The object whose method handles a command (through register_command's
    # wrapper for extended commands).
    if func is None or depth > 3:
        return None
    obj = getattr(func, '__self__', None)
    if obj is not None:
        return obj
    for cell in getattr(func, '__closure__', None) or ():
        try:
            val = cell.cell_contents
        except ValueError:
            continue
        if callable(val):
            obj = _owner(val, depth + 1)
            if obj is not None:
                return obj
    return None


def _is_template(obj):
    return (hasattr(obj, 'run_gcode_from_command') and hasattr(obj, 'render')
            and hasattr(obj, 'template'))


def _sandboxed(tw):
    env = getattr(tw.template, 'environment', None)
    return bool(getattr(env, 'sandboxed', False))


class _Lockdown:
    # What an encrypted print needs from the rest of Klipper: macro templates
    # that cannot run code, no macro in place of a command that carries the
    # part's geometry, no move stream, and status no finer than the UI's.
    def __init__(self, config, bridge):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.bridge = bridge
        self.builtin = set()
        self.slow = False
        self.history_floor = 0.
        self.status_cache = {}
        gm = self.printer.load_object(config, 'gcode_macro')
        self.env = self._sandbox(gm.env)
        gm.env = self.env
        # Templates compiled before this section loaded: compile them again
        # from printer.cfg, in the sandbox.
        for tw in self._templates():
            if not _sandboxed(tw):
                self._recompile(config, tw)
        self.printer.register_event_handler("klippy:ready", self._install)
    def _sandbox(self, env):
        sandbox = importlib.import_module('jinja2.sandbox')
        senv = sandbox.SandboxedEnvironment(
            block_start_string=env.block_start_string,
            block_end_string=env.block_end_string,
            variable_start_string=env.variable_start_string,
            variable_end_string=env.variable_end_string,
            comment_start_string=env.comment_start_string,
            comment_end_string=env.comment_end_string,
            line_statement_prefix=env.line_statement_prefix,
            line_comment_prefix=env.line_comment_prefix,
            trim_blocks=env.trim_blocks, lstrip_blocks=env.lstrip_blocks,
            keep_trailing_newline=env.keep_trailing_newline,
            extensions=list(env.extensions), undefined=env.undefined,
            finalize=env.finalize)
        senv.filters.update(env.filters)
        senv.tests.update(env.tests)
        senv.globals.update(env.globals)
        return senv
    def _recompile(self, config, tw):
        section, _, option = tw.name.rpartition(':')
        script = None
        if section and config.has_section(section):
            script = config.getsection(section).get(option, None)
        if script is None:
            # Not from printer.cfg: a default written in Klipper's code.
            self.builtin.add(id(tw))
            return
        tw.template = self.env.from_string(script)
    def _templates(self):
        # Every template wrapper reachable from a printer object (macros,
        # delayed_gcode, on_error_gcode, idle_timeout, display, menu...).
        seen = set()
        todo = [(obj, 0) for name, obj in self.printer.lookup_objects()]
        while todo:
            obj, depth = todo.pop()
            if id(obj) in seen or depth > 4 or len(seen) > 50000:
                continue
            seen.add(id(obj))
            if _is_template(obj):
                yield obj
                continue
            if isinstance(obj, dict):
                vals = list(obj.values())
            elif isinstance(obj, (list, tuple)):
                vals = list(obj)
            elif (hasattr(obj, '__dict__') and not callable(obj)
                  and obj is not self.printer and obj is not self.reactor):
                try:
                    vals = list(vars(obj).values())
                except TypeError:
                    continue
            else:
                continue
            todo.extend((v, depth + 1) for v in vals
                        if not isinstance(v, (str, bytes, int, float)))
    # The checks made at registration and again at the start
    def problem(self):
        gcode = self.printer.lookup_object('gcode')
        handlers = getattr(gcode, 'ready_gcode_handlers', {})
        macros = {id(obj): name for name, obj
                  in self.printer.lookup_objects('gcode_macro')}
        for cmd in GUARDED_COMMANDS:
            name = macros.get(id(_owner(handlers.get(cmd))))
            if name is not None:
                return ("[%s] stands in for %s, which carries the part's"
                        " geometry, process or start: an encrypted file does"
                        " not print while a macro overrides it (remove its"
                        " rename_existing or the macro)" % (name, cmd))
        for tw in self._templates():
            if not _sandboxed(tw) and id(tw) not in self.builtin:
                return ("the template %s is not sandboxed: it was compiled"
                        " outside [encrypted_file_bridge]'s sandbox; restart"
                        " Klipper, and report this if it persists"
                        % (tw.name,))
        return None
    # Installed once everything is loaded
    def _install(self):
        webhooks = self.printer.lookup_object('webhooks')
        orig_get_callback = webhooks.get_callback
        def get_callback(path):
            return self._guard_endpoint(path, orig_get_callback(path))
        webhooks.get_callback = get_callback
        mr = self.printer.lookup_object('motion_report', None)
        if mr is not None:
            dumps = (list(getattr(mr, 'steppers', {}).values())
                     + list(getattr(mr, 'trapqs', {}).values()))
            for dump in dumps:
                for hname in ('batch_bulk', 'api_dump'):
                    helper = getattr(dump, hname, None)
                    for cbname in ('batch_cb', 'data_cb'):
                        cb = getattr(helper, cbname, None)
                        if cb is not None:
                            setattr(helper, cbname, self._silenced(cb))
            if hasattr(mr, '_dump_shutdown'):
                mr._dump_shutdown = self._quiet(
                    mr._dump_shutdown, "motion_report shutdown dump", None)
        for name, mcu in self.printer.lookup_objects('mcu'):
            serial = getattr(mcu, '_serial', None)
            if serial is not None and hasattr(serial, 'dump_debug'):
                serial.dump_debug = self._quiet(
                    serial.dump_debug, "serial queues of %s" % (name,), "")
        for name in STATUS_OBJECTS:
            obj = self.printer.lookup_object(name, None)
            if obj is not None and hasattr(obj, 'get_status'):
                obj.get_status = self._slow_status(name, obj.get_status)
        # A macro the file runs sees the position as it is; any other (the
        # console, a delayed_gcode) sees it as the UI does.
        for tw in self._templates():
            tw.render = self._slowly(
                tw.render, lambda: not self.bridge.vsd.is_cmd_from_sd())
    def _guard_endpoint(self, path, cb):
        last = path.rsplit('/', 1)[-1]
        if last.startswith('dump_'):
            def refused(web_request):
                if self.bridge.locked():
                    raise self.printer.command_error(
                        "%s is refused while an encrypted file prints (it"
                        " streams the moves)" % (path,))
                return cb(web_request)
            return refused
        if path in ('objects/query', 'objects/subscribe'):
            return self._slowly(cb, lambda: True)
        return cb
    def _slowly(self, func, when):
        # While func runs (it never pauses), the position-carrying status
        # objects answer from a copy at most STATUS_INTERVAL old.
        def call(*args, **kwargs):
            prev = self.slow
            self.slow = prev or (self.bridge.locked() and when())
            try:
                return func(*args, **kwargs)
            finally:
                self.slow = prev
        return call
    def _slow_status(self, name, get_status):
        def status(*args):
            if not self.slow:
                return get_status(*args)
            now = self.reactor.monotonic()
            hit = self.status_cache.get(name)
            if hit is None or not hit[0] <= now < hit[0] + STATUS_INTERVAL:
                hit = self.status_cache[name] = (now, get_status(*args))
            return hit[1]
        return status
    def _silenced(self, cb):
        # The batch still runs, so the stream's cursor moves on; and nothing
        # that moved before the lockdown ended comes out afterwards (a
        # stream started later begins with Klipper's move history).
        def batch(eventtime):
            msg = cb(eventtime)
            if not msg or self.bridge.locked():
                return {}
            floor = self.history_floor
            if msg.get('first_step_time', floor) < floor:
                return {}
            if 'first_step_time' not in msg and 'data' in msg:
                data = [d for d in msg['data'] if d[0] >= floor]
                if not data:
                    return {}
                msg = dict(msg, data=data)
            return msg
        return batch
    def note_released(self):
        # Moves queued up to now belong to the encrypted print.
        toolhead = self.printer.lookup_object('toolhead', None)
        try:
            self.history_floor = toolhead.get_last_move_time()
        except Exception:
            logging.exception("encrypted_file_bridge: last move time")
    def _quiet(self, func, what, result):
        def quiet(*args):
            if self.bridge.locked():
                logging.info("encrypted_file_bridge: %s not logged (an"
                             " encrypted file was printing)", what)
                return result
            return func(*args)
        return quiet


class EncryptedFileBridge:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.timeout = config.getfloat('registration_timeout', 120.,
                                       minval=5.)
        self.prepare_timeout = config.getfloat('prepare_timeout', 660.,
                                               minval=5.)
        self.gcode = self.printer.lookup_object('gcode')
        # Before virtual_sdcard, so its on_error_gcode is sandboxed too.
        self.lockdown = _Lockdown(config, self)
        try:
            self.vsd = self.printer.load_object(config, 'virtual_sdcard')
        except config.error as e:
            raise config.error(
                "[encrypted_file_bridge] needs [virtual_sdcard]: %s" % (e,))
        if not callable(getattr(self.vsd, '_load_file', None)):
            version = self.printer.get_start_args().get('software_version')
            raise config.error(
                "[encrypted_file_bridge] does not support this Klipper (%s):"
                " virtual_sdcard has no _load_file" % (version,))
        self.sdcard_dirname = self.vsd.sdcard_dirname
        self.registrations = {}
        self.waiting = {}
        self.active = None
        self.furthest = 0
        self.unlock_time = 0.
        self.own_error = None
        vsd = self.vsd
        self.orig_load_file = vsd._load_file
        vsd._load_file = self._load_file
        self.orig_set_file_position = vsd.set_file_position
        vsd.set_file_position = self._set_file_position
        self.orig_do_resume = vsd.do_resume
        vsd.do_resume = self._do_resume
        vsd.gcode = _RedactingGCode(vsd.gcode, self)
        self.orig_respond_error = getattr(self.gcode, '_respond_error', None)
        if self.orig_respond_error is not None:
            self.gcode._respond_error = self._respond_error
        else:
            logging.warning("encrypted_file_bridge: cannot redact G-code"
                            " errors on this Klipper version")
        self.orig_M26 = self.gcode.register_command('M26', None)
        self.gcode.register_command('M26', self.cmd_M26)
        self.gcode.register_command(
            'UNREGISTER_ENCRYPTED_FILE', self.cmd_UNREGISTER_ENCRYPTED_FILE,
            desc=self.cmd_UNREGISTER_ENCRYPTED_FILE_help)
        webhooks = self.printer.lookup_object('webhooks')
        webhooks.register_endpoint(REGISTER_ENDPOINT, self._handle_register)
        webhooks.register_endpoint(REFUSE_ENDPOINT, self._handle_refuse)
        self.timer = self.reactor.register_timer(self._check_timer)
        self.printer.register_event_handler("klippy:shutdown",
                                            self._handle_shutdown)
        self.printer.register_event_handler("klippy:disconnect",
                                            self._release_all)
    # Status for UIs and Moonraker
    def get_status(self, eventtime):
        active = self.active
        return {
            'registered': sorted(self.registrations),
            'active': active.name if active is not None else None,
            'active_size': active.size if active is not None else 0,
            'locked': self.locked(eventtime),
        }
    def locked(self, eventtime=None):
        if self.registrations or self.waiting or self.active is not None:
            return True
        if eventtime is None:
            eventtime = self.reactor.monotonic()
        return eventtime < self.unlock_time
    def streaming(self):
        return (self.active is not None and self.vsd.current_file is
                self.active.file and self.vsd.is_cmd_from_sd())
    def note_line(self):
        # virtual_sdcard is about to run a line of the file: everything up
        # to the end of that line has been executed.
        if self.streaming():
            self.furthest = max(self.furthest, self.vsd.next_file_position)
    def redacted_error(self):
        return ("Error in encrypted file %s near byte %d (the line is not"
                " shown, to keep the file secret)"
                % (self.active.name, self.vsd.file_position))
    def is_own(self, msg):
        # The bridge's own refusals name no content of the file.
        return str(msg) == self.own_error
    def _respond_error(self, msg):
        if self.streaming() and not self.is_own(msg):
            msg = self.redacted_error()
        self.orig_respond_error(msg)
    # Name handling, as virtual_sdcard matches names
    def _normalize(self, filename):
        error = self.printer.command_error
        if filename.startswith('/'):
            filename = filename[1:]
        if (not filename or '\0' in filename or '\n' in filename
                or '\r' in filename):
            raise error("Invalid FILENAME %r" % (filename,))
        parts = filename.split('/')
        if filename.startswith('/') or '..' in parts or '' in parts:
            raise error(
                "FILENAME %r must name a file inside the virtual_sdcard"
                " folder, without '..' or empty path parts" % (filename,))
        if not filename.lower().endswith(VALID_EXTS):
            raise error("FILENAME %r is not a G-code file (.gcode, .g,"
                        " .gco)" % (filename,))
        return filename
    def _disk_path(self, filename, check_subdirs):
        # Resolve a name like virtual_sdcard does: exact, then any case.
        try:
            files = self.vsd.get_file_list(check_subdirs)
        except (OSError, IOError) as e:
            raise self.printer.command_error(
                "Unable to list the virtual_sdcard folder: %s" % (e,))
        names = [f[0] for f in files]
        if filename not in names:
            lower = {n.lower(): n for n in names}
            filename = lower.get(filename.lower())
            if filename is None:
                return None
        return os.path.join(self.sdcard_dirname, filename)
    def _is_encrypted(self, path):
        # Armored age is encrypted too: never stream it as G-code.
        try:
            with open(path, 'rb') as f:
                head = f.read(len(ARMOR))
        except (OSError, IOError):
            return False
        return head.startswith(MAGIC) or head == ARMOR
    def _find(self, table, filename):
        if filename in table:
            return filename
        for name in table:
            if name.lower() == filename.lower():
                return name
        return None
    # Registration: an API endpoint, so that nothing of it is G-code (no
    # console line, no gcode_store entry, no macro in between)
    def _peer_pid(self, web_request):
        try:
            sock = web_request.get_client_connection().sock
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize('3i'))
        except (AttributeError, OSError):
            return None
        return struct.unpack('3i', cred)[0]
    def _handle_register(self, web_request):
        error = self.printer.command_error
        filename = self._normalize(web_request.get_str('filename'))
        pid = web_request.get_int('pid')
        fdnum = web_request.get_int('fd')
        size = web_request.get_int('size')
        token = web_request.get_str('token')
        if fdnum < 0 or size < 0:
            raise error("fd and size must not be negative")
        if not TOKEN_RE.match(token):
            raise error("token must be encprint- and 1-32 of [0-9a-z]")
        peer = self._peer_pid(web_request)
        if pid == os.getpid() or pid != peer:
            raise error("pid %d is not the process that sent this request:"
                        " only the process holding the memfd registers it"
                        % (pid,))
        path = self._disk_path(filename, True)
        if path is None or not self._is_encrypted(path):
            raise error("%s is not an encrypted file in the virtual_sdcard"
                        " folder" % (filename,))
        problem = self.lockdown.problem()
        if problem is not None:
            raise error("cannot print %s: %s" % (filename, problem))
        proc_path = "/proc/%d/fd/%d" % (pid, fdnum)
        try:
            fd = os.open(proc_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise error("Unable to open %s: %s" % (proc_path, e.strerror))
        try:
            reg = self._check_memfd(fd, pid, fdnum, token, size, filename,
                                    path)
        except Exception:
            os.close(fd)
            raise
        old = self.registrations.pop(filename, None)
        if old is not None:
            old.close()
        waiter = self._find(self.waiting, filename)
        if waiter is not None:
            # A console or macro start is waiting for exactly this file.
            self.waiting.pop(waiter).complete(reg)
            web_request.send({'consumed': True})
            return
        self.registrations[filename] = reg
        self.reactor.update_timer(self.timer, self.reactor.NOW)
        web_request.send({'consumed': False})
    def _check_memfd(self, fd, pid, fdnum, token, size, filename, path):
        # Checked on our own descriptor, so the fd number cannot have been
        # reused in between. The refusals never say what the descriptor is.
        error = self.printer.command_error
        try:
            link = os.readlink("/proc/self/fd/%d" % (fd,))
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError as e:
            raise error("pid %d fd %d is not the memfd named by token (%s)"
                        % (pid, fdnum, e.strerror))
        if link != "/memfd:%s (deleted)" % (token,) or not stat.S_ISREG(
                st.st_mode):
            raise error("pid %d fd %d is not the memfd named by token"
                        % (pid, fdnum))
        key = (st.st_dev, st.st_ino)
        if key in _REGISTERED:
            raise error("this memfd was registered before: one decryption"
                        " prints once; start the print again from Moonraker")
        if seals & ALL_SEALS != ALL_SEALS:
            raise error("The memfd is not sealed against writes and"
                        " resizing (seals 0x%x)" % (seals,))
        if st.st_size != size:
            raise error("The memfd has %d bytes, size=%d"
                        % (st.st_size, size))
        index = self._seekgz_index(fd, size, filename)
        _REGISTERED.add(key)
        return _Registration(filename, path, fd, size, self.printer,
                             self.reactor.monotonic() + self.timeout, index,
                             self._io_thread() if index else None)
    def _io_thread(self):
        # Klipper master reads its files on virtual_sdcard's executor thread
        # (extras/aio_executor.py); older Klipper and Kalico have none.
        executor = getattr(self.vsd, 'executor', None)
        if callable(getattr(executor, 'submit', None)):
            return executor
        return None
    def _seekgz_index(self, fd, size, filename):
        # A memfd starting with the seekable gzip magic is one, and must be
        # a valid one; anything else is G-code as it is.
        error = self.printer.command_error
        try:
            head = os.pread(fd, len(SEEKGZ_MAGIC), 0)
            if not head.startswith(SEEKGZ_MAGIC[:2]):
                return None
            # An empty G-code is the footer member alone.
            if head not in (SEEKGZ_MAGIC, SEEKGZ_FOOTER_HEAD):
                raise SeekgzError("gzip but not a seekable gzip")
            return SeekgzIndex(fd, size)
        except (OSError, IOError) as e:
            raise error("cannot print %s: its decrypted copy is not a valid"
                        " seekable gzip (%s); encrypt the plain G-code with"
                        " encprint" % (filename, e))
    def _handle_refuse(self, web_request):
        # Moonraker could not prepare a file a console start waits for.
        filename = web_request.get_str('filename')
        message = web_request.get_str('message')
        waiter = self._find(self.waiting, filename)
        if waiter is not None:
            self.waiting.pop(waiter).complete(message)
        web_request.send({})
    cmd_UNREGISTER_ENCRYPTED_FILE_help = "Drop a registered encrypted file"
    def cmd_UNREGISTER_ENCRYPTED_FILE(self, gcmd):
        filename = gcmd.get('FILENAME', None)
        names = list(self.registrations) if filename is None else [
            self._normalize(filename)]
        for name in names:
            reg = self.registrations.pop(name, None)
            if reg is not None:
                reg.close()
    # One counted print runs the file once
    def _ran_to(self, pos):
        return (self.active is not None
                and self.vsd.current_file is self.active.file
                and pos < self.furthest)
    def _refuse_back(self, what, pos):
        self.own_error = (
            "%s refused: encrypted file %s already ran to byte %d and one"
            " decryption prints once, so it cannot go back to byte %d"
            " (resume continues where it paused)"
            % (what, self.active.name, self.furthest, pos))
        return self.printer.command_error(self.own_error)
    def cmd_M26(self, gcmd):
        pos = gcmd.get_int('S', minval=0)
        if self._ran_to(pos):
            raise self._refuse_back("M26", pos)
        self.orig_M26(gcmd)
    def _set_file_position(self, pos):
        if self._ran_to(pos):
            raise self._refuse_back("A loop back into the file", pos)
        self.orig_set_file_position(pos)
    def _do_resume(self):
        if self._ran_to(self.vsd.file_position):
            raise self._refuse_back("Resume", self.vsd.file_position)
        self.orig_do_resume()
    # virtual_sdcard hook
    def _load_file(self, gcmd, filename, check_subdirs=False):
        name = self._find(self.registrations, filename)
        if name is not None:
            reg = self.registrations.pop(name)
        else:
            path = self._disk_path(filename, check_subdirs)
            if path is None or not self._is_encrypted(path):
                return self.orig_load_file(gcmd, filename, check_subdirs)
            reg = self._prepare(gcmd, filename, check_subdirs)
        problem = self.lockdown.problem()
        if problem is not None:
            reg.close()
            raise gcmd.error("cannot print %s: %s" % (filename, problem))
        try:
            reg.file.seek(0, os.SEEK_END)
            fsize = reg.file.tell()
            reg.file.seek(0)
        except (OSError, IOError, ValueError) as e:
            reg.close()
            raise gcmd.error("Unable to read encrypted file %s: %s"
                             % (filename, e))
        vsd = self.vsd
        gcmd.respond_raw("File opened:%s Size:%d" % (filename, fsize))
        gcmd.respond_raw("File selected")
        vsd.current_file = reg.file
        vsd.file_position = 0
        vsd.file_size = fsize
        vsd.print_stats.set_current_file(filename)
        self.active = reg
        self.furthest = 0
        # Kalico's virtual_sdcard sends this after loading a file (its menu
        # listens); upstream Klipper has no handler, so it is a no-op there.
        self.printer.send_event("virtual_sdcard:load_file")
        self.reactor.update_timer(self.timer, self.reactor.NOW)
    def _prepare(self, gcmd, filename, check_subdirs):
        # A console, macro or M23 start of an encrypted file: Moonraker
        # decrypts and registers it while this command waits, so the rest of
        # the script runs as it would for a clear file.
        if self._find(self.waiting, filename) is not None:
            raise gcmd.error("%s is already being prepared" % (filename,))
        waiter = self.reactor.completion()
        self.waiting[filename] = waiter
        try:
            webhooks = self.printer.lookup_object('webhooks')
            try:
                webhooks.call_remote_method(REMOTE_METHOD, filename=filename,
                                            start=bool(check_subdirs))
            except self.printer.command_error:
                raise gcmd.error(
                    "%s is encrypted and Moonraker's encrypted_print component"
                    " is not connected to prepare it: check [encrypted_print]"
                    " in moonraker.conf" % (filename,))
            deadline = self.reactor.monotonic() + self.prepare_timeout
            res = waiter.wait(deadline, None)
        finally:
            if self.waiting.get(filename) is waiter:
                del self.waiting[filename]
        if res is None:
            raise gcmd.error("Moonraker did not prepare encrypted file %s"
                             " within %.0f s" % (filename,
                                                  self.prepare_timeout))
        if isinstance(res, str):
            raise gcmd.error(res)
        return res
    # Lifetime
    def _release_active(self):
        if self.active is not None:
            if self.vsd.current_file is self.active.file:
                self.vsd.current_file = None
            self.active.close()
            self.active = None
            self._ended(self.reactor.monotonic())
    def _check_timer(self, eventtime):
        for name, reg in list(self.registrations.items()):
            if eventtime >= reg.expires:
                logging.info("encrypted_file_bridge: registration of %s"
                             " expired unused", name)
                del self.registrations[name]
                reg.close()
        active = self.active
        if active is not None:
            ps = self.vsd.print_stats.get_status(eventtime)
            if self.vsd.current_file is not active.file:
                # virtual_sdcard closed it (end, cancel, reset, new print)
                active.close()
                self.active = None
                self._ended(eventtime)
            elif self.vsd.work_timer is None and active.file.read_error:
                # Not a pause: the print cannot go on; end it as an error
                # the UI shows, so it can be started (or cancelled) again.
                msg = ("Encrypted file %s cannot be read after byte %d %s"
                       % (active.name, self.vsd.file_position,
                          active.file.read_error))
                self._release_active()
                self.vsd.print_stats.note_error(msg)
                self.gcode.respond_raw("!! " + msg)
            elif (self.vsd.work_timer is None
                  and ps.get('state') == 'error'):
                self._release_active()
        if not self.registrations and self.active is None:
            return self.reactor.NEVER
        return eventtime + 1.
    def _ended(self, eventtime):
        self.unlock_time = eventtime + LOCKDOWN_GRACE
        self.lockdown.note_released()
    def _handle_shutdown(self):
        for reg in self.registrations.values():
            reg.close()
        self.registrations.clear()
        if self.active is not None:
            self.active.close()
        self.unlock_time = self.reactor.monotonic() + LOCKDOWN_GRACE
        for waiter in list(self.waiting.values()):
            waiter.complete("Klipper shut down")
    def _release_all(self):
        self._handle_shutdown()
        self.active = None

def load_config(config):
    return EncryptedFileBridge(config)
