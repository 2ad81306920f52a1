# Print encrypted G-code from a sealed memfd
#
# Moonraker's encrypted_print component decrypts a file into a sealed memfd and
# registers it here with REGISTER_ENCRYPTED_FILE; virtual_sdcard then streams
# it like any other file. An encrypted file that was not registered is never
# streamed as G-code. See docs/ and proto/PROTOCOL.md of klipper-encprint.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import fcntl, io, logging, os, re, stat

MAGIC = b"age-encryption.org/v1\n"
ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
ALL_SEALS = 0x1 | 0x2 | 0x4 | 0x8    # F_SEAL_SEAL|SHRINK|GROW|WRITE
F_GET_SEALS = 1034
VALID_EXTS = ('.gcode', '.g', '.gco')
TOKEN_RE = re.compile(r'^encprint-[0-9a-z]{1,32}$')
REMOTE_METHOD = "encrypted_print_prepare"


class ShutdownRead(IOError):
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


class _Registration:
    def __init__(self, name, path, fd, size, printer, expires):
        self.name = name
        self.size = size
        self.expires = expires
        raw = _MemfdRaw(fd, path, printer)
        self.file = io.TextIOWrapper(_GuardedBuffer(raw), encoding='utf-8',
                                     newline='')
    def close(self):
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
        try:
            self._gcode.run_script(script)
        except self._gcode.error:
            if self._bridge.streaming():
                raise self._gcode.error(self._bridge.redacted_error())
            raise


class EncryptedFileBridge:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.timeout = config.getfloat('registration_timeout', 120.,
                                       minval=5.)
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
        self.active = None
        self.orig_load_file = self.vsd._load_file
        self.vsd._load_file = self._load_file
        self.gcode = self.printer.lookup_object('gcode')
        self.vsd.gcode = _RedactingGCode(self.vsd.gcode, self)
        self.orig_respond_error = getattr(self.gcode, '_respond_error', None)
        if self.orig_respond_error is not None:
            self.gcode._respond_error = self._respond_error
        else:
            logging.warning("encrypted_file_bridge: cannot redact G-code"
                            " errors on this Klipper version")
        self.gcode.register_command(
            'REGISTER_ENCRYPTED_FILE', self.cmd_REGISTER_ENCRYPTED_FILE,
            desc=self.cmd_REGISTER_ENCRYPTED_FILE_help)
        self.gcode.register_command(
            'UNREGISTER_ENCRYPTED_FILE', self.cmd_UNREGISTER_ENCRYPTED_FILE,
            desc=self.cmd_UNREGISTER_ENCRYPTED_FILE_help)
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
        }
    def streaming(self):
        return (self.active is not None and self.vsd.current_file is
                self.active.file and self.vsd.is_cmd_from_sd())
    def redacted_error(self):
        return ("Error in encrypted file %s near byte %d (the line is not"
                " shown, to keep the file secret)"
                % (self.active.name, self.vsd.file_position))
    def _respond_error(self, msg):
        if self.streaming():
            msg = self.redacted_error()
        self.orig_respond_error(msg)
    # Name handling, as virtual_sdcard matches names
    def _normalize(self, gcmd, filename):
        if filename.startswith('/'):
            filename = filename[1:]
        if (not filename or '\0' in filename or '\n' in filename
                or '\r' in filename):
            raise gcmd.error("Invalid FILENAME %r" % (filename,))
        parts = filename.split('/')
        if filename.startswith('/') or '..' in parts or '' in parts:
            raise gcmd.error(
                "FILENAME %r must name a file inside the virtual_sdcard"
                " folder, without '..' or empty path parts" % (filename,))
        if not filename.lower().endswith(VALID_EXTS):
            raise gcmd.error("FILENAME %r is not a G-code file (.gcode, .g,"
                             " .gco)" % (filename,))
        return filename
    def _disk_path(self, gcmd, filename, check_subdirs):
        # Resolve a name like virtual_sdcard does: exact, then any case.
        try:
            files = self.vsd.get_file_list(check_subdirs)
        except (OSError, IOError) as e:
            raise gcmd.error("Unable to list the virtual_sdcard folder: %s"
                             % (e,))
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
    def _find(self, filename):
        reg = self.registrations.get(filename)
        if reg is None:
            for name in self.registrations:
                if name.lower() == filename.lower():
                    return self.registrations[name]
        return reg
    # Commands
    cmd_REGISTER_ENCRYPTED_FILE_help = (
        "Register a sealed memfd holding a decrypted file (used by Moonraker's"
        " encrypted_print)")
    def cmd_REGISTER_ENCRYPTED_FILE(self, gcmd):
        if self.vsd.is_cmd_from_sd():
            raise gcmd.error("REGISTER_ENCRYPTED_FILE cannot be run from a"
                             " file being printed")
        filename = self._normalize(gcmd, gcmd.get('FILENAME'))
        pid = gcmd.get_int('PID', minval=1)
        fdnum = gcmd.get_int('FD', minval=0)
        size = gcmd.get_int('SIZE', minval=0)
        token = gcmd.get('TOKEN')
        if not TOKEN_RE.match(token):
            raise gcmd.error("TOKEN must be encprint- and 1-32 of [0-9a-z]")
        path = self._disk_path(gcmd, filename, True)
        if path is None or not self._is_encrypted(path):
            raise gcmd.error("%s is not an encrypted file in the"
                             " virtual_sdcard folder" % (filename,))
        proc_path = "/proc/%d/fd/%d" % (pid, fdnum)
        try:
            fd = os.open(proc_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise gcmd.error("Unable to open %s: %s" % (proc_path,
                                                        e.strerror))
        try:
            # Checked on our own descriptor, so the fd number cannot have
            # been reused in between.
            link = os.readlink("/proc/self/fd/%d" % (fd,))
            if link != "/memfd:%s (deleted)" % (token,):
                raise gcmd.error("PID=%d FD=%d is not the memfd %s (it is %s)"
                                 % (pid, fdnum, token, link))
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise gcmd.error("PID=%d FD=%d is not a regular file"
                                 % (pid, fdnum))
            seals = fcntl.fcntl(fd, F_GET_SEALS)
            if seals & ALL_SEALS != ALL_SEALS:
                raise gcmd.error("The memfd is not sealed against writes and"
                                 " resizing (seals 0x%x)" % (seals,))
            if st.st_size != size:
                raise gcmd.error("The memfd has %d bytes, SIZE=%d"
                                 % (st.st_size, size))
            reg = _Registration(filename, path, fd, size, self.printer,
                                self.reactor.monotonic() + self.timeout)
        except OSError as e:
            os.close(fd)
            raise gcmd.error("Unable to check %s: %s" % (proc_path,
                                                         e.strerror))
        except Exception:
            os.close(fd)
            raise
        old = self.registrations.pop(filename, None)
        if old is not None:
            old.close()
        self.registrations[filename] = reg
        self.reactor.update_timer(self.timer, self.reactor.NOW)
        gcmd.respond_info("Encrypted file %s registered (%d bytes)"
                          % (filename, size), log=False)
    cmd_UNREGISTER_ENCRYPTED_FILE_help = "Drop a registered encrypted file"
    def cmd_UNREGISTER_ENCRYPTED_FILE(self, gcmd):
        filename = gcmd.get('FILENAME', None)
        names = list(self.registrations) if filename is None else [
            self._normalize(gcmd, filename)]
        for name in names:
            reg = self.registrations.pop(name, None)
            if reg is not None:
                reg.close()
    # virtual_sdcard hook
    def _load_file(self, gcmd, filename, check_subdirs=False):
        reg = self._find(filename)
        if reg is None:
            path = self._disk_path(gcmd, filename, check_subdirs)
            if path is not None and self._is_encrypted(path):
                self._ask_moonraker(gcmd, filename, check_subdirs)
            return self.orig_load_file(gcmd, filename, check_subdirs)
        del self.registrations[reg.name]
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
        self.printer.send_event("virtual_sdcard:load_file")
        self.reactor.update_timer(self.timer, self.reactor.NOW)
    def _ask_moonraker(self, gcmd, filename, check_subdirs):
        # Never stream ciphertext: ask Moonraker to decrypt and start it.
        start = bool(check_subdirs)   # SDCARD_PRINT_FILE, not M23
        webhooks = self.printer.lookup_object('webhooks')
        try:
            webhooks.call_remote_method(REMOTE_METHOD, filename=filename,
                                        start=start)
        except self.printer.command_error:
            raise gcmd.error(
                "%s is encrypted and Moonraker's encrypted_print component is"
                " not connected to prepare it: check [encrypted_print] in"
                " moonraker.conf, then start the print from Mainsail or"
                " Fluidd" % (filename,))
        raise gcmd.error(
            "%s is encrypted: Moonraker is decrypting it and will %s"
            % (filename, "start the print" if start else "select it (then"
               " send M24)"))
    # Lifetime
    def _release_active(self):
        if self.active is not None:
            if self.vsd.current_file is self.active.file:
                self.vsd.current_file = None
            self.active.close()
            self.active = None
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
            elif (self.vsd.work_timer is None
                  and ps.get('state') == 'error'):
                self._release_active()
        if not self.registrations and self.active is None:
            return self.reactor.NEVER
        return eventtime + 1.
    def _handle_shutdown(self):
        for reg in self.registrations.values():
            reg.close()
        self.registrations.clear()
        if self.active is not None:
            self.active.close()
    def _release_all(self):
        self._handle_shutdown()
        self.active = None


def load_config(config):
    return EncryptedFileBridge(config)
